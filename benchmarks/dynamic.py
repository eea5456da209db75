"""Dynamic inference on SST-2: early exit (DeeBERT, FastBERT heads; entropy and patience
policies) and PoWER-BERT, accuracy against layers run and measured CPU time.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/dynamic.py --workdir runs/dynamic

Trains (or reuses) the runs of configs/dynamic.py from the teacher, then on the full dev set:
- each early-exit policy through `ExitRunner` (batches of 32, sorted by length, regrouped
  after every exit) against the teacher's own jitted forward on the same batches;
- each PoWER-BERT model's jitted forward against the teacher's, on the same batches, and at
  batch 32 x 128 (`latency.paired_latency`).
Times are paired: the two passes alternate for `--rounds` rounds and the speed-up is the
median of per-round ratios, so a slow spell of a shared machine hits both. Writes
benchmarks/results/dynamic.json.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxcompress.compress.dynamic import early_exit
from jaxcompress.compress.dynamic.early_exit import ExitRunner, Policy
from jaxcompress.config import buckets_of, load_config
from jaxcompress.data import glue as data
from jaxcompress.experiments.latency import paired_latency
from jaxcompress.experiments.results import write_result
from jaxcompress.models.bert import Bert
from jaxcompress.train import loop as train
from jaxcompress.train.evaluate import make_eval_step
from jaxcompress.train.inputs import load_any, load_eval_splits, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "dynamic.py"
EXIT_RUNS = ("exits_labels", "exits_final", "exits_labels_mean", "exits_final_mean")
POWER_RUNS = ("power_mild", "power_strong")
POLICIES = (
    *(Policy("entropy", t) for t in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)),
    *(Policy("patience", k) for k in (2, 3, 4)),
)
BATCH = 32


def paired_speedup(baseline: Callable[[], object], candidate: Callable[[], object], rounds: int):
    """Median over rounds of baseline seconds / candidate seconds (alternating which runs
    first), the median seconds of each, and the candidate's output; both run once before
    timing (compilation)."""
    baseline()
    output = candidate()
    ratios, base_s, cand_s = [], [], []
    for r in range(rounds):
        timed = {}
        for name, fn in (("b", baseline), ("c", candidate))[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fn()
            timed[name] = time.perf_counter() - t0
        ratios.append(timed["b"] / timed["c"])
        base_s.append(timed["b"])
        cand_s.append(timed["c"])
    return statistics.median(ratios), statistics.median(base_s), statistics.median(cand_s), output


def over_dev(batches: list, size: int, predict: Callable) -> tuple[np.ndarray, np.ndarray]:
    """Logits and layers run of every dev example; `predict(batch) -> (logits, layers)`."""
    logits, layers = np.zeros((size, 2), np.float32), np.zeros(size)
    for batch, index in batches:
        out, run = predict(batch)
        keep = index >= 0
        logits[index[keep]], layers[index[keep]] = out[keep], run[keep]
    return logits, layers


def jitted(step: Callable, params: dict, layers: int) -> Callable:
    """`predict` of a whole-model eval step: every example runs every layer."""
    return lambda batch: (np.asarray(step(params, batch)), np.full(len(batch["labels"]), layers))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "dynamic")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flags", default="", help="config flags, e.g. ',quick,teacher=PATH'")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    summaries = {}
    for name in (*EXIT_RUNS, *POWER_RUNS):
        config = load_config(f"{CONFIG}:{name}{args.flags}")
        summaries[name] = (config, train.train(config, args.workdir / name))
    config = summaries[EXIT_RUNS[0]][0]
    split = load_eval_splits(config, load_tokenizer(config))["validation"]
    batches = []
    for batch in data.eval_batches(split, BATCH, buckets_of(config)):
        index = batch.pop("index")
        batches.append((batch, index))
    labels, size = np.asarray(split.labels), len(split)

    teacher_config, teacher_params = load_any(config.model, num_labels=2)
    layers = teacher_config.num_hidden_layers
    teacher = functools.partial(
        over_dev,
        batches,
        size,
        jitted(make_eval_step(Bert(teacher_config)), teacher_params, layers),
    )
    teacher_accuracy = accuracy(teacher()[0], labels)
    rows = [{"name": "teacher", "value": teacher_accuracy, "relative": 1.0, "mean_layers": layers}]

    for name in EXIT_RUNS:
        run_config, summary = summaries[name]
        exit_config, params, exits, pooling = early_exit.load_exit_model(
            args.workdir / name / "exits"
        )
        runner = ExitRunner(exit_config, params, exits, pooling)
        for policy in POLICIES:
            candidate = functools.partial(
                over_dev, batches, size, functools.partial(runner.run, policy=policy)
            )
            speedup, base_s, exit_s, (logits, run) = paired_speedup(teacher, candidate, args.rounds)
            value = accuracy(logits, labels)
            rows.append(
                {
                    "name": f"{name} {policy.kind}={policy.value:g}",
                    "heads": run_config.early_exit.targets,
                    "pooling": pooling,
                    "policy": policy.kind,
                    "threshold": policy.value,
                    "value": value,
                    "relative": value / teacher_accuracy,
                    "mean_layers": float(run.mean()),
                    "speedup": speedup,
                    "teacher_dev_s": base_s,
                    "dev_s": exit_s,
                    "exit_accuracy": summary.get("exit_accuracy"),
                }
            )
            logging.info("%s", {k: v for k, v in rows[-1].items() if k != "exit_accuracy"})

    for name in POWER_RUNS:
        run_config, summary = summaries[name]
        keep = tuple(run_config.token_keep)
        power_config, params = load_any(
            str(args.workdir / name / "model"), num_labels=2, token_keep=keep
        )
        step = make_eval_step(Bert(power_config))
        candidate = functools.partial(over_dev, batches, size, jitted(step, params, layers))
        speedup, base_s, power_s, (logits, _) = paired_speedup(teacher, candidate, args.rounds)
        value = accuracy(logits, labels)
        fixed = paired_latency((teacher_config, teacher_params), (power_config, params))
        rows.append(
            {
                "name": name,
                "token_keep": list(keep),
                "value": value,
                "relative": value / teacher_accuracy,
                "trained_value": summary["value"],
                "speedup": speedup,
                "teacher_dev_s": base_s,
                "dev_s": power_s,
                "speedup_b32_l128": fixed["speedup"],
            }
        )
        logging.info("%s", rows[-1])

    write_result(
        args.out / "dynamic.json",
        "dynamic",
        {
            "teacher": {
                "model": config.model,
                "task": "sst2",
                "metric": "accuracy",
                "value": teacher_accuracy,
            },
            "training": {
                "steps": config.train.steps,
                "batch_size": config.train.batch_size,
                "train_examples": config.train.examples,
                "note": "exit heads: teacher frozen, heads only; PoWER-BERT: the teacher "
                "fine-tuned under elimination by logit distillation from itself",
            },
            "device": str(jax.devices()[0].platform),
            "rounds": args.rounds,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
