"""Do movement scores rank weights better than chance when pruning starts? A diagnostic.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/movement_scores.py runs/prune/stages/student-A/config.json ... \
      --workdir runs/movement_scores

For each movement-pruning run config, trains it at two seeds (data order and dropout; the
first of `--seeds` and the second) up to its first pruning step (`prune.begin` of the run)
and compares the weights each would keep at 50% and 90% sparsity, per pruned matrix:
- seed vs seed: the share of one seed's kept weights the other also keeps;
- scores vs magnitude: the share of the score-kept weights that magnitude pruning keeps.
Rows are named by the start model, the score rule (`prune.score_update`: 'adam' trains
scores as the weights, 'sum' accumulates -dL/dW' * W) and the sparsity.
Rankings unrelated to each other overlap by the kept fraction (0.5 and 0.1). Writes
benchmarks/results/movement_scores.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from jaxcompress.compress.prune import unstructured as prune
from jaxcompress.config import config_from_json
from jaxcompress.experiments.results import write_result
from jaxcompress.train import checkpoint
from jaxcompress.train import loop as train
from jaxcompress.train.inputs import load_teacher

REPO = Path(__file__).resolve().parents[1]
SPARSITIES = (0.5, 0.9)


def scores_at(config, workdir: Path) -> tuple[dict, dict, int]:
    """Movement scores and weights (by path) of the run when its pruning begins."""
    total = config.train.steps
    stop = round(config.prune.begin * total)
    with config.unlocked():
        config.checkpoint_every = stop
    train.train(config, workdir, stop_after_step=stop)
    teacher, _ = load_teacher(config)
    _, _, _, like, _ = train.initial_state(config, total, teacher.config if teacher else None)
    state = checkpoint.restore_latest(checkpoint.manager(workdir / "checkpoints"), like)
    if int(state.step) != stop:
        raise RuntimeError(f"{workdir} holds step {int(state.step)}, expected {stop}")
    model, scores = prune.split_scores(jax.device_get(state.params))
    flat = flatten_dict(model, sep="/")
    return {p: np.asarray(s) for p, s in scores.items()}, flat, stop


def kept(values: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean mask of the round((1 - sparsity) * n) largest values."""
    flat = values.reshape(-1)
    keep = round((1 - sparsity) * flat.size)
    mask = np.zeros(flat.size, bool)
    mask[np.argsort(-flat, kind="stable")[:keep]] = True
    return mask


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / a.sum())


def compare(config_file: Path, seeds: tuple[int, int], workdir: Path) -> list[dict]:
    """The rows of one run config: both seeds' kept sets at each sparsity."""
    runs = []
    for seed in seeds:
        config = config_from_json(json.loads(config_file.read_text()))
        with config.unlocked():
            config.seed = seed
        runs.append(scores_at(config, workdir / f"{config_file.parent.name}-s{seed}"))
    (scores_a, weights_a, steps), (scores_b, _, _) = runs
    rows = []
    for sparsity in SPARSITIES:
        seed_overlaps, magnitude_overlaps = [], []
        for path, score in scores_a.items():
            mine = kept(score, sparsity)
            seed_overlaps.append(overlap(mine, kept(scores_b[path], sparsity)))
            magnitude_overlaps.append(overlap(mine, kept(np.abs(weights_a[path]), sparsity)))
        agreement = float(np.mean(seed_overlaps))
        rule = config.prune.score_update
        rows.append(
            {
                # earlier rows (scores trained by Adam, the only rule then) have no rule in
                # their name
                "name": f"{config.model} {rule} s{sparsity:g}",
                "score_update": rule,
                "metric": "seed_vs_seed",  # shared share of kept weights; chance = 1 - sparsity
                "value": agreement,
                "start": config.model,
                "steps_trained": steps,
                "sparsity": sparsity,
                "chance": 1 - sparsity,
                "seed_vs_seed": agreement,
                "seed_vs_seed_min": float(np.min(seed_overlaps)),
                "seed_vs_seed_max": float(np.max(seed_overlaps)),
                "scores_vs_magnitude": float(np.mean(magnitude_overlaps)),
                "matrices": len(seed_overlaps),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="movement runs' config.json")
    parser.add_argument("--seeds", nargs=2, type=int, default=(0, 1))
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "movement_scores")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    rows = [row for c in args.configs for row in compare(c, tuple(args.seeds), args.workdir)]
    for row in rows:
        print(
            f"{row['name']}: chance {row['chance']:.3f}, seed vs seed {row['seed_vs_seed']:.3f}, "
            f"scores vs magnitude {row['scores_vs_magnitude']:.3f}"
        )
    out = args.out / "movement_scores.json"
    if out.exists():  # keep the rows of other configs
        measured = {r["name"] for r in rows}
        rows += [r for r in json.loads(out.read_text())["rows"] if r["name"] not in measured]
    write_result(out, "movement_scores", {"rows": rows})


if __name__ == "__main__":
    main()
