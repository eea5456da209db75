"""ALBERT-family compression of the SST-2 teacher: size, accuracy after recovery, CPU latency.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/albert_family.py --workdir runs/albert

Each variant of configs/albert.py is applied to the teacher, its dev accuracy measured right
after the transform, then recovered by logit distillation from the teacher (runs are
resumable: a finished run is reused) and measured again. Latency is a jitted forward at
batch 32, sequence 128, teacher and variant timed in this same process.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from jaxcompress.config import load_config
from jaxcompress.experiments.latency import compiled_program_size, inference_latency
from jaxcompress.experiments.measure import measure_model
from jaxcompress.experiments.results import write_result
from jaxcompress.models import artefact
from jaxcompress.train import loop as train
from jaxcompress.train.evaluate import evaluate_model
from jaxcompress.train.inputs import load_any, load_eval_splits, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
# A variant of configs/albert.py, its flags after '+', seeds after ':': "share_all+long:1".
DEFAULT_VARIANTS = (
    "e128:3,e64,e128_svd,e64_svd,share_all,share_all+long+layers,share_2,share_3,"
    "lowrank_ffn_50,lowrank_ffn_25"
)


def recovery_text(config) -> str:
    d = config.distill
    layers = [f"{k} {d[k]}" for k in ("hidden", "embedding", "attention") if d[k]]
    extra = f" + layer terms ({', '.join(layers)})" if layers else ""
    return (
        f"logit KD from the teacher, alpha {d.alpha}, T {d.temperature}{extra}, "
        f"lr {config.train.lr}"
    )


def run_name(variant: str, seed: int) -> str:
    return variant if seed == 0 else f"{variant}_s{seed}"  # seed 0 keeps the plain name


def dev_accuracy(config, bert_config, params, splits) -> float:
    return evaluate_model(config, bert_config, params, splits)["validation"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/albert")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/albert_family.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    t_start = time.perf_counter()

    base = load_config(str(REPO / "configs/albert.py:e128"), args.overrides)
    tokenizer = load_tokenizer(base)
    dev = load_eval_splits(base, tokenizer)
    teacher_config, teacher_params = load_any(base.distill.teacher)
    teacher = measure_model(base, teacher_config, teacher_params, dev, latency=True)
    teacher_acc = teacher["value"]
    print(f"teacher: accuracy {teacher_acc:.4f}, latency {teacher['latency_s']:.3f}s")

    # Phase 1: transform, measure, recover (the CPU-heavy part; resumable).
    trained = {}
    for spec in args.variants.split(","):
        variant, _, seeds = spec.partition(":")
        config_arg = variant.replace("+", ",")  # "share_all+long" -> "share_all,long"
        config = load_config(str(REPO / f"configs/albert.py:{config_arg}"), args.overrides)
        bert_config, params = load_model(config)
        before = dev_accuracy(config, bert_config, params, dev)
        summaries, t0 = [], time.perf_counter()
        for seed in range(int(seeds or 1)):
            seeded = load_config(
                str(REPO / f"configs/albert.py:{config_arg}"), [*args.overrides, f"seed={seed}"]
            )
            summaries.append(train.train(seeded, Path(args.workdir) / run_name(variant, seed)))
        trained[variant] = (config, before, summaries, time.perf_counter() - t0)
        values = [s["value"] for s in summaries]
        print(f"{variant}: {before:.4f} -> {values} after recovery")

    # Phase 2: latency of every variant next to the teacher, nothing else running.
    teacher_program = compiled_program_size(teacher_config, teacher_params)
    rows = []
    for variant, (config, before, summaries, wall) in trained.items():
        summary = summaries[0]
        values = [s["value"] for s in summaries]
        bert_config, params = artefact.load(Path(args.workdir) / variant / "compressed")
        latency = inference_latency(bert_config, params)
        again = inference_latency(teacher_config, teacher_params)  # same-run reference
        size = artefact.saved_bytes(params)
        count = artefact.count_params(params)
        value = statistics.mean(values)
        rows.append(
            {
                "name": variant,
                "transform": config.transforms[0],
                "task": "sst2",
                "metric": "accuracy",
                "value": value,
                "before_recovery": before,
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "seeds": len(values),
                "values": values,
                "relative": value / teacher_acc,
                "params": int(count),
                "params_relative": count / teacher["params"],
                **size,
                "bytes_relative": size["bytes"] / teacher["bytes"],
                "bytes_no_embeddings_relative": size["bytes_no_embeddings"]
                / teacher["bytes_no_embeddings"],
                "latency_s": latency["median_s"],
                "teacher_latency_s": again["median_s"],
                "latency_ratio": {"cpu": again["median_s"] / latency["median_s"], "gpu": None},
                "compiled_program_chars": compiled_program_size(bert_config, params),
                "teacher_compiled_program_chars": teacher_program,
                "train_examples": summary["steps"] * config.train.batch_size,
                "train_subset": "first steps*batch examples of the seed-0 shuffle of SST-2 train",
                "steps": summary["steps"],
                "recovery": recovery_text(config),
                "wall_s": summary.get("train_seconds_this_run", wall),
            }
        )
        ratio = again["median_s"] / latency["median_s"]
        print(f"{variant}: {value / teacher_acc:.3f} of teacher, latency x{ratio:.2f}")
    write_result(
        args.out,
        "albert_family",
        {
            "teacher": {
                "model": base.distill.teacher,
                "task": "sst2",
                **{k: v for k, v in teacher.items() if k != "eval"},
            },
            "latency_setting": "jitted forward, batch 32, sequence 128, median of 10",
            "rows": rows,
            "wall_s": time.perf_counter() - t_start,
        },
    )


if __name__ == "__main__":
    main()
