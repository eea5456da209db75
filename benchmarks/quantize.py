"""Quantization of the SST-2 teacher: bits, packed bytes, accuracy, int8 latency.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/quantize.py --workdir runs/quantize [--qat]

Post-training rows (no training): W8A8 with calibrated activation ranges, 8-bit weights
only, GOBO at 3 bits (float embeddings, and 4-bit embeddings); two integer-execution rows run
the W8 artefact with int8 x int8 -> int32 matmuls, with dynamic per-tensor activation scales
and with the W8A8 stage's calibrated ranges, each timed against the float teacher, paired in
the same process, at batch 1 and 32 (x 128). `--integer` measures only those two rows.
`--qat` adds the quantization-aware training sweeps of configs/ablations/sst2.py
(`quantization`: Q8BERT, group-wise 4-bit, Q-BERT mixed precision, TernaryBERT; then
`binarybert`, which splits the TernaryBERT runs into binary halves), 3 seeds, resumable.
`--update` rewrites only the QAT rows of the runs finished in WORKDIR (e.g. after
`jaxcompress sweep configs/ablations/sst2.py:binarybert --workdir WORKDIR/qat`) and keeps
the file's other rows with the commit that measured them.
Writes benchmarks/results/quantize.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from jaxcompress.compress.quant import hessian
from jaxcompress.compress.quant import int8 as int8_exec
from jaxcompress.experiments import recipes, report, sweep
from jaxcompress.experiments.latency import paired_latency
from jaxcompress.experiments.results import write_result
from jaxcompress.models.bert import Bert
from jaxcompress.train.evaluate import evaluate_splits, make_eval_step
from jaxcompress.train.inputs import load_any, load_eval_splits, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEACHER = "minilm-l6-sst2-teacher"
W8 = {"kernels": "bits=8", "embeddings": "bits=8,granularity='tensor'"}
POST_TRAINING = {
    "task": "sst2",
    "stages": (
        {
            "name": "ptq_w8a8",
            "kind": "quantize",
            "model": TEACHER,
            "quantize": {**W8, "activation_bits": 8},
        },
        {"name": "ptq_w8", "kind": "quantize", "model": TEACHER, "quantize": W8},
        {"name": "gobo_w3", "kind": "gobo", "model": TEACHER, "kernels": 3, "embeddings": 0},
        {"name": "gobo_w3_e4", "kind": "gobo", "model": TEACHER, "kernels": 3, "embeddings": 4},
        {"name": "teacher", "kind": "evaluate", "models": (TEACHER,)},
    ),
}
BITS = {"ptq_w8a8": "W8A8", "ptq_w8": "W8", "gobo_w3": "W3 (GOBO)", "gobo_w3_e4": "W3 E4 (GOBO)"}
# Weights, embeddings, activations of the QAT sweep's variants (configs/ablations/sst2.py).
QAT_BITS = {
    "qat_w8a8 q8bert": "W8 E8 A8",
    "qat_weights w4_group": "W4 (g128) E8",
    "qat_qbert mixed3": "mixed, avg {average:.2f} (g128) E8",
    "qat_ternary_kd w2a8": "W2 E2 A8 (ternary)",
    "qat_ternary_kd w2a8_epoch": "W2 E2 A8 (ternary)",
    "qat_binary_tws w1a8_tws": "2 x W1, 2 x E1, A8 (BinaryBERT split)",
    "qat_binary_tws w1a8_tws_epoch": "2 x W1, 2 x E1, A8 (BinaryBERT split)",
}


def integer_rows(workdir: Path, teacher: dict) -> list[dict]:
    """The W8 weights run on integers, with dynamic per-tensor activation scales and with
    the W8A8 stage's calibrated (static) ranges: dev accuracy and paired CPU latency."""
    config = recipes.task_config("sst2", TEACHER)
    bert_config, params = load_any(TEACHER)
    weights = int8_exec.int8_weights(workdir / "ptq_w8" / "quantized" / "params.safetensors")
    record = json.loads((workdir / "ptq_w8a8" / "quantized" / "quantization.json").read_text())
    dev = load_eval_splits(config, load_tokenizer(config))
    rows = []
    for name, ranges, how in (
        ("int8_execution_w8a8_dynamic", None, "each input's own absmax, per tensor"),
        ("int8_execution_w8a8_static", record["activations"]["ranges"], "ptq_w8a8's ranges"),
    ):
        integer = int8_exec.IntegerModel(Bert(bert_config), weights, ranges=ranges)
        results = evaluate_splits(config, make_eval_step(integer), params, dev)
        value = results["validation"]["accuracy"]
        latency = {
            f"batch_{b}": paired_latency((bert_config, params), (integer, params), batch_size=b)
            for b in (1, 32)
        }
        rows.append(
            {
                "name": name,
                "bits": "W8A8 (int8 matmul)",
                "task": "sst2",
                "metric": "accuracy",
                "value": value,
                "seeds": 1,
                "relative": value / teacher["value"],
                "activation_scales": how,
                "latency_ratio": {"cpu": latency["batch_32"]["speedup"], "gpu": None},
                "latency": latency,
                "note": "XLA's CPU backend has no int8 GEMM library kernel; see the README",
            }
        )
        print(name, f"{value:.4f}", f"{value / teacher['value']:.4f}", latency)
    return rows


def update_integer(workdir: Path, t0: float) -> None:
    """Rewrite the result file with fresh integer-execution rows (running the two
    post-training stages they read, if not done); other rows are kept as they were, with the
    commit, date and CPU that measured them."""
    target = REPO / "benchmarks/results/quantize.json"
    old = json.loads(target.read_text())
    stages = [s for s in POST_TRAINING["stages"] if s["name"] in ("ptq_w8a8", "ptq_w8")]
    recipes.run_recipe({**POST_TRAINING, "stages": tuple(stages)}, workdir / "ptq")
    keep(target, old, integer_rows(workdir / "ptq", old["teacher"]), t0)


def keep(target: Path, old: dict, fresh: list[dict], t0: float) -> None:
    """Write `fresh` rows over the old file's rows of the same name; the others stay, with
    the commit, date and CPU that measured them."""
    new = {row["name"]: row for row in fresh}
    carried = {"commit": old["commit"], "date": old["date"], "cpu": old["machine"]["cpu"]}
    rows = [new.pop(row["name"], {**carried, **row}) for row in old["rows"]]
    rows += new.values()  # rows the file did not have yet
    body = {"teacher": old["teacher"], "rows": rows, "wall_s": time.perf_counter() - t0}
    write_result(target, "quantize", body)
    for row in rows:
        print(row["name"], f"{row['value']:.4f}", f"{row['relative']:.3f}", row.get("commit", ""))


def qbert_bits(workdir: Path, runs: list[dict]) -> dict:
    """Q-BERT's chosen bits per encoder layer, per seed, and their parameter-weighted average."""
    _, params = load_any(TEACHER)
    sizes = hessian.group_sizes(params, hessian.encoder_layer_group)
    chosen = {}
    for run in runs:
        if run["technique"] == "qat_qbert":
            record = workdir / run["stages"]["student"] / "quantized" / "quantization.json"
            chosen[run["seed"]] = json.loads(record.read_text())["layer_bits"]
    averages = [float(hessian.average_bits(sizes, bits)) for bits in chosen.values()]
    return {"layer_bits": chosen, "average_bits": averages}


def variant(run: dict) -> str:
    """A run's (or a report row's) variant: 'technique strength'."""
    return f"{run['technique']} {run['strength']}"


def measured_train(run: dict) -> dict:
    """The `train` config of the stage that trained the model a run measures."""
    trained = report.trained_stage(run)
    stages = run["config"]["recipe"]["stages"]
    return next(s for s in stages if s["name"] == trained)["config"]["train"]


def budget(train: dict) -> dict:
    """A row's training budget from its stage's `train` config: -1 steps is `epochs` (the
    default 1) over the train set, -1 examples all of it."""
    return {
        "steps": train["steps"] if train["steps"] > 0 else f"{train.get('epochs', 1):g} epoch",
        "batch_size": train["batch_size"],
        "train_examples": train["examples"] if train["examples"] > 0 else "all",
    }


def qat_rows(family: str, workdir: Path, run: bool = True) -> list[dict]:
    """The rows of one QAT sweep family of configs/ablations/sst2.py, run (or resumed) in
    `workdir`, or with `run=False` of its runs finished so far: mean and std over seeds of
    each variant (`seeds` says how many)."""
    config = sweep.load_sweep(f"configs/ablations/sst2.py:{family}")
    if run:
        runs = sweep.run_sweep(config, workdir)
        if len(runs) < len(sweep.expand(config)):
            raise SystemExit("the QAT sweep was interrupted; rerun to resume it")
    else:
        runs = sweep.finished_runs(config, workdir)
        if not runs:
            return []
    written = report.write_report(
        [workdir], workdir / f"report_{family}", plots=False, base=sweep.base_key(config)
    )
    budgets = {variant(run): budget(measured_train(run)) for run in runs}  # rows differ in it
    curves = report.learning_curves(runs)
    mixed = qbert_bits(workdir, runs) if family == "quantization" else {}
    average = statistics.fmean(mixed["average_bits"]) if mixed.get("average_bits") else 0.0
    rows = []
    for r in written["rows"]:
        name = variant(r)
        rows.append(
            {
                "name": name,
                "bits": QAT_BITS.get(name, "").format(average=average),
                "task": "sst2",
                "metric": r["metric"],
                "value": r["mean"],
                "std": r["std"],
                "seeds": len(r["seeds"]),
                "relative": r["relative"],
                "bytes": r["bytes"],
                "bytes_no_embeddings": r["bytes_no_embeddings"],
                "compression": 1 / r["size"],
                "compression_no_embeddings": 1 / r["size_no_embeddings"],
                # The trained model run in float (dequantized weights): quantization's own
                # speed on this CPU is the int8 execution row's.
                "latency_ratio": {"cpu": r.get("speedup"), "gpu": None},
                "values": r["values"],
                **budgets[name],
                **({"dev_during_training": curves[name]} if name in curves else {}),
                **(mixed if r["technique"] == "qat_qbert" else {}),
            }
        )
    return rows


def update(workdir: Path, t0: float) -> None:
    """Rewrite the result file with fresh QAT rows for the runs finished in `workdir`; the
    rows it does not recompute are kept as they were, with the commit, date and CPU that
    measured them."""
    target = REPO / "benchmarks/results/quantize.json"
    fresh = [
        row
        for family in ("quantization", "binarybert")
        for row in qat_rows(family, workdir / "qat", run=False)
    ]
    keep(target, json.loads(target.read_text()), fresh, t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--qat", action="store_true", help="also run the QAT sweep (hours)")
    parser.add_argument(
        "--qat-finished", action="store_true", help="QAT rows of the runs finished so far"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="only the QAT rows of the runs finished in WORKDIR; every other row is kept from "
        "the existing result file, tagged with the commit, date and CPU that measured it",
    )
    parser.add_argument(
        "--integer",
        action="store_true",
        help="only the integer-execution rows (dynamic and calibrated activation scales); "
        "every other row is kept, as --update keeps them",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    workdir = Path(args.workdir)
    if args.update:
        update(workdir, t0)
        return
    if args.integer:
        update_integer(workdir, t0)
        return
    summaries = {s["stage"]: s for s in recipes.run_recipe(POST_TRAINING, workdir / "ptq")}
    teacher = summaries.pop("teacher")["rows"][0]
    rows = [
        {
            "name": name,
            "bits": BITS[name],
            "task": "sst2",
            "metric": s["metric"],
            "value": s["value"],
            "seeds": 1,
            "relative": s["value"] / teacher["value"],
            "bytes": s["bytes"],
            "bytes_no_embeddings": s["bytes_no_embeddings"],
            "compression": teacher["bytes"] / s["bytes"],
            "compression_no_embeddings": teacher["bytes_no_embeddings"] / s["bytes_no_embeddings"],
        }
        for name, s in summaries.items()
    ]
    rows += integer_rows(workdir / "ptq", teacher)
    body = {"teacher": {"model": TEACHER, "task": "sst2", "metric": "accuracy", **teacher}}
    if args.qat or args.qat_finished:
        for family in ("quantization", "binarybert"):  # binarybert reuses the ternary stages
            rows += qat_rows(family, workdir / "qat", run=not args.qat_finished)
    body.update(rows=rows, wall_s=time.perf_counter() - t0)
    write_result(REPO / "benchmarks/results/quantize.json", "quantize", body)
    for row in rows:
        print(row["name"], f"{row['value']:.4f}", f"{row['relative']:.3f}")


if __name__ == "__main__":
    main()
