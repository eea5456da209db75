"""Run the survey's Table 1 over five GLUE tasks (configs/ablations/glue.py) a run at a time.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/glue_grid.py --tasks rte,mrpc,stsb,cola,sst2 --seeds 0,1,2

The grid is about a hundred training runs, more than one session of this machine affords, so
it is built to be continued: runs go seed by seed (every task's seed 0 before any seed 1),
each finished run's summary is archived in benchmarks/results/ablation_glue_runs/ (small
JSON, committed), and archived runs are put back into WORKDIR before sweeping, so a fresh
checkout skips them. After every run the report is rewritten: benchmarks/results/
ablation_glue.{json,md,csv} and one Pareto plot per task (and of the average once a model
has every task). Each row says how many seeds it holds; one with fewer than 3 claims nothing.
`--report` rewrites the report from the archive and trains nothing.

The small tasks' teachers must exist first (benchmarks/glue_teachers.py's default workdir,
runs/glue_teachers/ of the repository, which the config names relative to the repository
root, so that run keys and the archive hold in any checkout). A teacher that is
fine-tuned again on another machine can differ in its last digits, so the result file keeps
each task's teacher value per run and says when runs of one task saw different teachers.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from jaxcompress.experiments import report, sweep
from jaxcompress.experiments.results import write_result

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "ablations" / "glue.py"
log = logging.getLogger("glue_grid")


def sweeps(task: str) -> dict[str, dict]:
    """The task's two sweeps by workdir name: GOBO (no training) and the main comparison."""
    return {
        f"{task}_gobo": sweep.load_sweep(f"{CONFIG}:{task},gobo"),
        task: sweep.load_sweep(f"{CONFIG}:{task}"),
    }


def runs_at(task: str, seed: int) -> list[tuple[str, dict, sweep.Run]]:
    """`(sweep name, sweep config, run)` of every run of the task at `seed`; GOBO trains
    nothing and runs at seed 0 only."""
    return [
        (name, config, run)
        for name, config in sweeps(task).items()
        if seed in config["seeds"]
        for run in sweep.expand(config, {"seed": [str(seed)]})
    ]


def finished(workdir: Path, name: str, run_dir: str) -> Path:
    """Where sweep `name` keeps the summary of its finished run `run_dir`."""
    return workdir / name / "runs" / run_dir / "summary.json"


def restore(archive: Path, workdir: Path) -> int:
    """Puts every archived run summary, ARCHIVE/<sweep>/<run>.json, back into WORKDIR/<sweep>/
    as a finished run (see sweep.restore_runs); returns how many it restored."""
    sweeps = sorted(d for d in archive.glob("*") if d.is_dir())
    return sum(sweep.restore_runs(d, workdir / d.name) for d in sweeps)


def budget(summary: dict) -> dict:
    """The measured stage's training budget, as its config states it."""
    stages = summary["config"]["recipe"]["stages"]
    config = stages[-1].get("config", {})
    train = config.get("train", {})
    keys = ("steps", "epochs", "examples", "batch_size")
    return {k: train[k] for k in keys if k in train} or {"training": "none"}


def write_grid_report(workdir: Path, out: Path, command_note: str) -> str:
    """The Table-1 report of every finished run under WORKDIR; returns its Markdown table."""
    dirs = sorted(d for d in workdir.iterdir() if (d / "runs").is_dir())
    written = report.write_report(dirs, out, allow_mixed=True)
    summaries = written["summaries"]
    teachers: dict[str, dict] = {}
    for s in summaries:
        ref = s["reference"]
        entry = teachers.setdefault(
            s["task"], {"model": ref["model"], "metric": s["metric"], "values": set()}
        )
        entry["values"].add(round(ref["value"], 6))
    budgets = {(s["technique"], s["strength"], s["task"]): budget(s) for s in summaries}
    rows = [
        {
            **report.result_row(r),
            "claim": len(r["seeds"]) >= 3 or r["technique"] == "gobo",
            "reference": r["reference"],
            "drop_points": 100 * (r["reference"] - r["mean"]),
            "budget": budgets[r["technique"], r["strength"], r["task"]],
        }
        for r in written["rows"]
    ]
    averaged, reference = report.average_rows(written["rows"], written["references"])
    seeds: dict[tuple, list[int]] = {}
    for r in written["rows"]:
        seeds.setdefault((r["technique"], r["strength"]), []).append(len(r["seeds"]))
    body = {
        "sweep": "configs/ablations/glue.py:TASK and TASK,gobo",
        "teachers": {
            task: {**t, "values": sorted(t["values"]), "consistent": len(t["values"]) == 1}
            for task, t in sorted(teachers.items())
        },
        "distillation": "logits, alpha 0.5, temperature 2 (MSE for STS-B); layers_tinybert "
        "adds hidden, attention and embedding terms",
        "latency": "paired CPU latency, batch 32 x 128, median of alternating rounds",
        "note": command_note,
        "table": written["table"],
        "plots": [p.name for p in written["written"] if p.suffix == ".png"],
        "rows": rows,
        "average": {
            "tasks": sorted(written["references"]),
            "reference": reference["value"],
            "rows": [
                {
                    "name": f"{a['technique']} {a['strength']}",
                    "value": a["mean"],
                    "drop_points": 100 * (reference["value"] - a["mean"]),
                    "bytes_relative": a["size"],
                    "latency_ratio_cpu": a.get("speedup"),
                    "min_seeds": min(seeds[a["technique"], a["strength"]]),
                }
                for a in averaged
            ],
        },
    }
    write_result(out.with_suffix(".json"), out.name, body)
    return written["table"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="rte,mrpc,stsb,cola,sst2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default="runs/glue")
    parser.add_argument("--archive", default=str(REPO / "benchmarks/results/ablation_glue_runs"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/ablation_glue"))
    parser.add_argument("--note", default="", help="how it ran, for the result file")
    parser.add_argument("--report", action="store_true", help="rewrite the report; train none")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    workdir, archive, out = (Path(p).resolve() for p in (args.workdir, args.archive, args.out))
    os.chdir(REPO)  # configs/ablations/glue.py names the teachers relative to it
    log.info("restored %d archived runs into %s", restore(archive, workdir), workdir)
    if not args.report:
        tasks = args.tasks.split(",")
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            for task in tasks:
                for name, config, run in runs_at(task, seed):
                    only = {
                        "technique": [run.technique],
                        "strength": [run.strength],
                        "seed": [str(run.seed)],
                    }
                    if finished(workdir, name, run.dir_name).exists():
                        continue
                    t0 = time.perf_counter()
                    log.info("%s: %s", name, run.label)
                    if not sweep.run_sweep(config, workdir / name, only):
                        raise SystemExit("interrupted: rerun the same command to resume")
                    sweep.archive_runs(workdir / name, archive / name)
                    log.info("%s: %s done in %.0f s", name, run.label, time.perf_counter() - t0)
                    write_grid_report(workdir, out, args.note)
    print(write_grid_report(workdir, out, args.note))
    found = {p.parent.name for p in archive.glob("*/*.json")}
    log.info("archive holds %d runs of %d sweeps", len(list(archive.glob("*/*.json"))), len(found))


if __name__ == "__main__":
    main()
