"""Run an ablation sweep and keep its report (Table-1 markdown, CSV, Pareto plot) as results.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/ablation.py configs/ablations/sst2.py:main --workdir runs/ablation_sst2

Resumable (finished runs are reused); `--finished` reports the runs finished so far without
training (e.g. after `jaxcompress sweep ... --only seed=0`). Writes
benchmarks/results/ablation_<family>_sst2.json (or `--name`.json; the pruning issue's table
is `--name prune`) with one row per variant (mean and std over seeds), plus .md, .csv and
one PNG per task. Each row has the steps its stage trained and, where the runs evaluated
while training, their dev curves; `--fit-examples N` adds each row's and the teacher's
metric on the first N train examples (fit beside generalisation).

Each finished run's summary is kept beside the results in benchmarks/results/<name>_runs/
(small JSON, committed) and put back into --workdir first, so another checkout rewrites the
report with `--finished` and adds seeds to it without training the runs it holds again.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from jaxcompress.experiments import report, sweep
from jaxcompress.experiments.results import write_result
from jaxcompress.train.evaluate import evaluate_saved

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="path/to/sweep.py[:arg]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--name", help="result name (default: ablation_<family>_sst2)")
    parser.add_argument(
        "--finished", action="store_true", help="report the runs finished so far; train none"
    )
    parser.add_argument(
        "--archive",
        help="where finished run summaries are kept with the results, and put back into "
        "--workdir from (default: benchmarks/results/<name>_runs/)",
    )
    parser.add_argument(
        "--fit-examples",
        type=int,
        default=0,
        help="also evaluate each run's measured model and the teacher on the first N train "
        "examples (how well each fits what it trained on, beside dev)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    config = sweep.load_sweep(args.config)
    name = args.name or f"ablation_{config['name'].removeprefix('sst2_')}_sst2"
    archive = Path(args.archive or REPO / "benchmarks" / "results" / f"{name}_runs")
    logging.info("restored %d archived runs", sweep.restore_runs(archive, args.workdir))
    if args.finished:
        summaries = sweep.finished_runs(config, args.workdir)
        if not summaries:
            raise SystemExit(f"no finished runs of {args.config} under {args.workdir}")
    else:
        summaries = sweep.run_sweep(config, args.workdir)
        if len(summaries) < len(sweep.expand(config)):
            raise SystemExit("the sweep was interrupted; rerun the same command to resume it")
    logging.info("archived %d runs in %s", sweep.archive_runs(args.workdir, archive), archive)
    prefix = REPO / "benchmarks" / "results" / name
    written = report.write_report([args.workdir], prefix, base=sweep.base_key(config))
    first = summaries[0]
    stages = {(s["technique"], s["strength"]): report.training_stages(s) for s in summaries}
    curves = report.learning_curves(summaries)
    fits = train_fits(summaries, args.workdir, args.fit_examples) if args.fit_examples else {}
    rows = []
    for r in written["rows"]:
        own = stages[r["technique"], r["strength"]]
        # a variant may train longer than the base (e.g. the combined pruning row)
        row = {
            **report.result_row(r),
            "steps": own[-1]["steps"],
            **({"epochs": own[-1]["epochs"]} if "epochs" in own[-1] else {}),
            "train_examples": own[-1]["train_examples"],
        }
        if len(own) > 1:
            row["stages"] = own
        if row["name"] in fits:
            row["train_fit"] = fits[row["name"]]
        if row["name"] in curves:  # the dev metric at each evaluation while training, per seed
            row["dev_during_training"] = curves[row["name"]]
        rows.append(row)
    base = stages[first["technique"], first["strength"]]
    write_result(
        prefix.with_suffix(".json"),
        name,
        {
            "sweep": args.config,
            "teacher": {
                "model": first["reference"]["model"],
                "task": first["task"],
                "metric": first["metric"],
                "value": first["reference"]["value"],
                **({"train_fit": fits["reference"]} if fits else {}),
            },
            "training": {
                **base[-1],
                **({"stages": base} if len(base) > 1 else {}),
                "note": "a fixed random subset of the SST-2 train set (one pass at the base "
                "steps; each row's `steps` says its own, and a row of several stages its "
                "`stages`; train_examples -1: the whole train set); full dev",
            },
            "latency": "paired CPU latency, batch 32 x 128, median of 10 alternating rounds",
            "table": written["table"],
            "plots": [p.name for p in written["written"] if p.suffix == ".png"],
            "rows": rows,
            "wall_s": time.perf_counter() - t0,
        },
    )
    print(written["table"])


def train_fits(summaries: list[dict], workdir: str, examples: int) -> dict[str, dict]:
    """The task metric on the first `examples` train examples of each run's measured model
    (per seed, and their mean) and of the reference, keyed by row name and "reference"."""
    first = summaries[0]

    def fit(model: str) -> float:
        split = evaluate_saved(model, first["task"], ["train"], examples=examples)["train"]
        return split[first["metric"]]

    fits: dict[str, dict] = {}
    for s in sorted(summaries, key=lambda s: s["seed"]):
        stage = Path(workdir) / s["stages"][s["config"]["measure"]] / "summary.json"
        if not stage.exists():  # e.g. a run put back from the archive
            raise SystemExit(
                f"--fit-examples needs the model run {s['label']} trained, and {stage} is "
                "missing: rerun without --fit-examples, or in the workdir that trained it"
            )
        trained = json.loads(stage.read_text())
        row = fits.setdefault(f"{s['technique']} {s['strength']}", {"values": []})
        row["values"].append(fit(trained.get("model_dir") or trained["saved"]))
    for row in fits.values():
        row["value"] = statistics.fmean(row["values"])
    fits["reference"] = {"value": fit(first["reference"]["model"])}
    return {name: {"examples": examples, **row} for name, row in fits.items()}


if __name__ == "__main__":
    main()
