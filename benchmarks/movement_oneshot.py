"""Which ranking of the teacher's weights keeps its accuracy, pruned at once with no training?

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/movement_oneshot.py

Ranks each encoder dense kernel of the fine-tuned teacher by
- magnitude |W|;
- movement in the teacher's own fine-tune from the pre-trained model, |W| - |W_base|: the
  score Adam-trained movement scores would have summed over that fine-tune (weights and
  scores both move by normalised steps), without the minibatch noise of a short run;
- movement with a magnitude prior, |W| - (1 - m) |W_base| (`prune.score_magnitude` = m);
- chance (a fixed random ranking),
keeps the top (1 - s) of each kernel (`unstructured.keep_top`, scope 'layer') and measures
the full SST-2 dev set. Writes benchmarks/results/movement_oneshot.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxcompress import core
from jaxcompress.compress.prune import unstructured as prune
from jaxcompress.config import finetune_defaults, glue_dir
from jaxcompress.data import glue
from jaxcompress.experiments.results import write_result
from jaxcompress.models.bert import Bert
from jaxcompress.train.evaluate import evaluate, make_eval_step
from jaxcompress.train.inputs import load_any, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEACHER = "minilm-l6-sst2-teacher"
BASE = "sentence-transformers/all-MiniLM-L6-v2"  # what the teacher was fine-tuned from
RULES = ((r"bert/encoder/.*/kernel", True), (".*", None))
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.97)
PRIORS = (0.5, 0.2, 0.1, 0.05)  # score_magnitude values; 0 is pure movement


def rankings(teacher: dict, base: dict, seed: int) -> dict[str, dict[str, jax.Array]]:
    """Scores by weight path for every ranking, from the library's own score init."""

    def scores(tree: dict) -> dict[str, jax.Array]:
        return prune.split_scores(tree)[1]

    out = {"magnitude": scores(prune.add_movement_scores(teacher, RULES, magnitude=1.0))}
    out["movement"] = scores(prune.add_movement_scores(teacher, RULES, fine_tuned_from=base))
    for m in PRIORS:
        tree = prune.add_movement_scores(teacher, RULES, fine_tuned_from=base, magnitude=m)
        out[f"movement+{m:g}|W_base|"] = scores(tree)
    key = jax.random.key(seed)
    out["chance"] = {
        p: jax.random.uniform(jax.random.fold_in(key, i), s.shape)
        for i, (p, s) in enumerate(sorted(out["magnitude"].items()))
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--base", default=BASE, help="the model the teacher was fine-tuned from")
    parser.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    bert_config, teacher = load_any(args.teacher)
    _, base = load_any(args.base)
    config = finetune_defaults()
    with config.unlocked():
        config.model, config.max_length = args.teacher, args.max_length
    split = glue.tokenize_split(
        glue.load_split("sst2", "validation", glue_dir(config)),
        "sst2",
        load_tokenizer(config),
        args.max_length,
    )
    step = make_eval_step(Bert(bert_config))

    def accuracy(params: dict) -> float:
        result = evaluate(step, params, split, "sst2", 64, (args.max_length,))
        return float(result["accuracy"])

    reference = accuracy(teacher)
    rows = []
    for name, scores in rankings(teacher, base, seed=0).items():
        for sparsity in args.sparsities:
            masks = prune.keep_top(scores, jnp.float32(sparsity), "layer")
            pruned = core.map_with_path(
                lambda path, w, m=masks: jnp.where(m[path], w, 0) if path in m else w, teacher
            )
            value = accuracy(pruned)
            rows.append(
                {
                    "name": f"{name} s{sparsity:g}",
                    "ranking": name,
                    "sparsity": sparsity,
                    "task": "sst2",
                    "metric": "accuracy",
                    "value": value,
                    "relative": value / reference,
                    "dev_examples": len(split),
                    "trained_steps": 0,
                }
            )
            print(f"{name:>22} s{sparsity:<5g} {value:.4f}", flush=True)
    body = {
        "teacher": {"model": args.teacher, "metric": "accuracy", "value": reference},
        "base": args.base,
        "pruned": "each encoder dense kernel to its own sparsity (scope 'layer')",
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    write_result(args.out / "movement_oneshot.json", "movement_oneshot", body)


if __name__ == "__main__":
    main()
