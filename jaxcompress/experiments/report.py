"""Sweep reports: runs aggregated over seeds into a survey Table-1 layout, CSV and Pareto plots."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from jaxcompress.errors import UserError
from jaxcompress.experiments.results import markdown_table
from jaxcompress.experiments.summary import read_run_summary

TASK_NAMES = {
    "sst2": "SST-2",
    "cola": "CoLA",
    "mrpc": "MRPC",
    "stsb": "STS-B",
    "rte": "RTE",
}
READS = "`jaxcompress report` reads the --workdir of a `jaxcompress sweep`"


class NoRunsError(UserError, FileNotFoundError):
    """A directory that holds no sweep run summaries."""


class MixedBasesError(UserError, ValueError):
    """Runs of different base configs passed to one report."""


def _summary_format(path: Path) -> object:
    try:
        return json.loads(path.read_text()).get("format")
    except (ValueError, AttributeError):
        return None


def not_a_sweep(directory: Path) -> str:
    """Why `directory` holds no sweep runs: what it is instead, and which command reads it."""
    lead = f"no run summaries (runs/*/summary.json) under {directory}"
    if (directory / "results.md").is_file() or any(
        _summary_format(f) is None for f in directory.glob("*/summary.json")
    ):
        return (
            f"{lead}: it is a recipe workdir (written by `jaxcompress recipe`), whose results "
            f"table is {directory / 'results.md'}; {READS}"
        )
    if (directory / "config.json").is_file() and (directory / "checkpoints").is_dir():
        return (
            f"{lead}: it is a finetune run directory, whose results are in "
            f"{directory / 'summary.json'} (rescore its model with `jaxcompress eval --model "
            f"{directory / 'model'} --task TASK`); {READS}"
        )
    if (directory / "summary.json").is_file() and _summary_format(directory / "summary.json"):
        parents = directory.resolve().parents
        workdir = parents[1] if len(parents) > 1 else "two levels up"
        return f"{lead}: it is one run of a sweep; pass the sweep's workdir ({workdir})"
    return f"{lead}; {READS}"


def collect(
    directories: Sequence[str | Path], allow_mixed: bool = False, base: str | None = None
) -> list[dict]:
    """Every run summary under the given sweep (or `runs/`) directories; with `base`, only
    the runs of that sweep base (`sweep.base_key`), for sweeps sharing one workdir.

    Runs of different base configs (recipe, reference, measured stage, overrides) do not
    belong in one table; that raises unless `allow_mixed`.
    """
    files: list[Path] = []
    for directory in map(Path, directories):
        if not directory.is_dir():
            raise NoRunsError(f"{directory} is not a directory; {READS}")
        if (directory / "runs").is_dir():
            found = sorted((directory / "runs").glob("*/summary.json"))
        else:  # a sweep's runs/ folder itself, or something else
            found = sorted(directory.glob("*/summary.json"))
            if not found or any(_summary_format(f) is None for f in found):
                raise NoRunsError(not_a_sweep(directory))
        if not found:
            raise NoRunsError(not_a_sweep(directory))
        files += found
    summaries = [read_run_summary(f) for f in files]
    if base is not None:
        kept = [(f, s) for f, s in zip(files, summaries, strict=True) if s["base"] == base]
        if not kept:
            raise NoRunsError(f"no run summaries of base {base} under {directories}")
        files, summaries = [f for f, _ in kept], [s for _, s in kept]
    bases: dict[str, list[str]] = {}
    for f, s in zip(files, summaries, strict=True):
        bases.setdefault(s["base"], []).append(str(f.parent))
    if len(bases) > 1 and not allow_mixed:
        detail = "; ".join(f"{b}: {dirs[0]} (+{len(dirs) - 1})" for b, dirs in bases.items())
        raise MixedBasesError(
            f"runs from {len(bases)} different base configs ({detail}); compare them only "
            "knowingly (allow_mixed / --allow-mixed)"
        )
    return summaries


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(summaries: Sequence[dict]) -> list[dict]:
    """One row per (technique, strength, task): mean and sample std over seeds, relative to
    the reference, sizes as shares of the reference's, speedup as a median-of-ratios mean."""
    groups: dict[tuple, list[dict]] = {}
    for s in sorted(summaries, key=lambda s: (s["position"], s["task"])):
        groups.setdefault((s["technique"], s["strength"], s["task"]), []).append(s)
    rows = []
    for (technique, strength, task), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        reference = runs[0]["reference"]
        mean, std = _mean_std([r["value"] for r in runs])
        row = {
            "technique": technique,
            "strength": strength,
            "task": task,
            "metric": runs[0]["metric"],
            "mean": mean,
            "std": std,
            "seeds": [r["seed"] for r in runs],
            "values": [r["value"] for r in runs],
            "reference": reference["value"],
            "relative": mean / reference["value"],
            "params": runs[0]["params"],
            "bytes": runs[0]["bytes"],
            "bytes_no_embeddings": runs[0]["bytes_no_embeddings"],
            "size": runs[0]["bytes"] / reference["bytes"],
            "size_no_embeddings": runs[0]["bytes_no_embeddings"] / reference["bytes_no_embeddings"],
        }
        if all("speedup" in r for r in runs):
            row["speedup"], row["speedup_std"] = _mean_std([r["speedup"] for r in runs])
        if all("remaining_params" in r for r in runs):  # unstructured pruning: nonzeros kept
            row["remaining_params"] = round(statistics.fmean(r["remaining_params"] for r in runs))
        rows.append(row)
    return rows


def result_row(row: dict) -> dict:
    """An `aggregate` row in a result file's standard row fields (DESIGN.md); benchmarks add
    their own fields to it."""
    return {
        "name": f"{row['technique']} {row['strength']}",
        "task": row["task"],
        "metric": row["metric"],
        "value": row["mean"],
        "std": row["std"],
        "seeds": len(row["seeds"]),
        "values": row["values"],
        "relative": row["relative"],
        "params": row["params"],
        # Unstructured pruning stores zeros in a dense model: count what the sparse keeps.
        "remaining_params": row.get("remaining_params", row["params"]),
        "bytes": row["bytes"],
        "bytes_no_embeddings": row["bytes_no_embeddings"],
        "bytes_relative": row["size"],
        "bytes_relative_no_embeddings": row["size_no_embeddings"],
        "latency_ratio": {"cpu": row.get("speedup"), "gpu": None},
    }


def average_rows(rows: Sequence[dict], references: dict[str, dict]) -> tuple[list[dict], dict]:
    """The survey's average over tasks: one row per model that has every task (its metrics'
    mean, sizes and speed-up averaged over tasks), and the reference's average alike.

    Args:
      rows: `aggregate`'s rows.
      references: `reference_rows`'s references by task.

    Returns:
      The average rows (task 'average'; metric 'average') and the reference's average.
    """
    tasks = sorted(references)
    models: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        models.setdefault((r["technique"], r["strength"]), {})[r["task"]] = r
    averaged = []
    for (technique, strength), by_task in models.items():
        if sorted(by_task) != tasks:
            continue
        runs = list(by_task.values())
        row = {
            "technique": technique,
            "strength": strength,
            "task": "average",
            "metric": "average",
            "mean": statistics.fmean(r["mean"] for r in runs),
            "std": 0.0,  # tasks differ in kind: no spread over them is shown
            "size": statistics.fmean(r["size"] for r in runs),
        }
        if all("speedup" in r for r in runs):
            row["speedup"] = statistics.fmean(r["speedup"] for r in runs)
        averaged.append(row)
    reference = {"value": statistics.fmean(references[t]["value"] for t in tasks)}
    return averaged, reference


def reference_rows(summaries: Sequence[dict]) -> dict[str, dict]:
    """The reference model's numbers per task, as the runs recorded them."""
    return {s["task"]: s["reference"] for s in summaries}


def table(rows: Sequence[dict], references: dict[str, dict]) -> str:
    """Markdown laid out like the survey's Table 1: one row per model, its parameters (the
    kept ones when unstructured-pruned), size as % of the reference with and without
    embeddings, speedup, each task's metric (x100, mean ± std over seeds) and the average
    drop in points against the reference."""
    tasks = sorted({r["task"] for r in rows})
    headers = [TASK_NAMES.get(t, t) for t in tasks]
    columns = ["model", "params", "size %", "size % (no emb.)", "speedup", *headers, "avg drop"]
    first = references[tasks[0]]
    models = {str(references[t]["model"]) for t in tasks}
    name = Path(models.pop()).name if len(models) == 1 else "each task's teacher"
    lines = [
        {
            "model": f"reference ({name})",
            "params": f"{first['params'] / 1e6:.1f}M",
            "size %": "100",
            "size % (no emb.)": "100",
            "speedup": "1.00x",
            **{
                h: f"{100 * references[t]['value']:.2f}"
                for h, t in zip(headers, tasks, strict=True)
            },
            "avg drop": "0",
        }
    ]
    models: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        models.setdefault((r["technique"], r["strength"]), {})[r["task"]] = r
    for (technique, strength), by_task in models.items():
        some = next(iter(by_task.values()))
        drops = [100 * (references[t]["value"] - r["mean"]) for t, r in by_task.items()]
        speedup = some.get("speedup")
        lines.append(
            {
                "model": f"{technique} {strength}",
                "params": f"{some.get('remaining_params', some['params']) / 1e6:.1f}M",
                "size %": f"{100 * some['size']:.1f}",
                "size % (no emb.)": f"{100 * some['size_no_embeddings']:.1f}",
                "speedup": "" if speedup is None else f"{speedup:.2f}x",
                **{
                    h: _cell(by_task[t]) if t in by_task else ""
                    for h, t in zip(headers, tasks, strict=True)
                },
                "avg drop": f"{statistics.fmean(drops):.2f}",
            }
        )
    return markdown_table(lines, columns)


def _cell(row: dict) -> str:
    n = len(row["seeds"])
    return f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f} (n={n})"


CSV_COLUMNS = (
    "technique",
    "strength",
    "task",
    "metric",
    "mean",
    "std",
    "seeds",
    "values",
    "reference",
    "relative",
    "params",
    "bytes",
    "bytes_no_embeddings",
    "size",
    "size_no_embeddings",
    "speedup",
    "speedup_std",
)


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Every aggregated row with all its fields; lists are joined with spaces."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()}
            )
    return Path(path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, quality) that no other point beats: lower or equal cost
    and higher or equal quality, strictly better in one. Sorted by cost."""
    front = []
    for i, (cost, quality) in enumerate(points):
        dominated = any(
            c <= cost and q >= quality and (c < cost or q > quality)
            for j, (c, q) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot(rows: Sequence[dict], reference: dict, task: str, path: str | Path) -> Path:
    """One PNG for `task`: metric against size (% of the reference's bytes) and, where timed,
    against latency (% of the reference's), reference included, Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["task"] == task]
    names = ["reference"] + [f"{r['technique']} {r['strength']}" for r in rows]
    quality = [reference["value"]] + [r["mean"] for r in rows]
    errors = [0.0] + [r["std"] for r in rows]
    axes_costs = [("size, % of reference bytes", [100.0] + [100 * r["size"] for r in rows])]
    if rows and all("speedup" in r for r in rows):
        latency = [100.0] + [100 / r["speedup"] for r in rows]
        axes_costs.append(("latency, % of reference (CPU, batch 32 x 128)", latency))
    fig, axes = plt.subplots(1, len(axes_costs), figsize=(6 * len(axes_costs), 4.5), squeeze=False)
    for ax, (label, cost) in zip(axes[0], axes_costs, strict=True):
        ax.errorbar(cost, quality, yerr=errors, fmt="o", color="tab:blue", capsize=3)
        front = pareto_front(list(zip(cost, quality, strict=True)))
        ax.plot(
            [cost[i] for i in front],
            [quality[i] for i in front],
            "--",
            color="tab:red",
            label="Pareto front",
        )
        for x, y, name in zip(cost, quality, names, strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label)
        metric = rows[0]["metric"] if rows else ""
        named = f"{TASK_NAMES.get(task, task)} dev {metric}"
        ax.set_ylabel("average dev score over tasks" if task == "average" else named)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def trained_stage(run: dict) -> str:
    """The stage whose training a run's measured model comes from: the measured stage if it
    fine-tunes, else the last fine-tuning stage before it (e.g. before a `share_layers`
    transform that stores the trained model in fewer bytes)."""
    stages = run["config"]["recipe"]["stages"]
    measured = [s["name"] for s in stages].index(run["config"]["measure"])
    tuned = [s["name"] for s in stages[: measured + 1] if s["kind"] == "finetune"]
    return tuned[-1] if tuned else run["config"]["measure"]


def learning_curves(runs: Sequence[dict]) -> dict[str, dict]:
    """Each variant's dev metric at the evaluations its trained stage (`trained_stage`) made
    while training (`eval.every_steps`), per seed, from the runs' summaries.

    Returns:
      {"technique strength" (a row's name): {seed: {step: value}}}, with only the runs that
      evaluated more than once.
    """
    curves: dict[str, dict] = {}
    for run in runs:
        records = {record["stage"]: record for record in run.get("training", [])}
        record = records.get(trained_stage(run), {"dev": []})
        points = {point["step"]: point[run["metric"]] for point in record["dev"]}
        if len(points) > 1:
            curves.setdefault(f"{run['technique']} {run['strength']}", {})[run["seed"]] = points
    return curves


def training_stages(run: dict) -> list[dict]:
    """What each finetune stage of a run trained, from its summary: the stage, its steps, its
    epochs where its config gave epochs rather than steps, its batch size and its configured
    train examples (-1: the whole train set)."""
    stages = []
    for record in run.get("training", []):
        configured = record["configured"]
        stages.append(
            {
                "stage": record["stage"],
                "steps": record["steps"],
                **({"epochs": round(record["epochs"], 2)} if configured["steps"] <= 0 else {}),
                "batch_size": configured["batch_size"],
                "train_examples": configured["examples"],
            }
        )
    return stages


def write_report(
    directories: Sequence[str | Path],
    out_prefix: str | Path,
    allow_mixed: bool = False,
    plots: bool = True,
    base: str | None = None,
) -> dict:
    """Writes `<prefix>.md`, `<prefix>.csv` and `<prefix>_<task>.png` (of the runs of
    `base` only, if given); returns the rows, references, table, written paths and the run
    summaries they came from."""
    summaries = collect(directories, allow_mixed, base)
    rows = aggregate(summaries)
    references = reference_rows(summaries)
    markdown = table(rows, references)
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = [prefix.with_suffix(".md"), write_csv(rows, prefix.with_suffix(".csv"))]
    written[0].write_text(markdown + "\n")
    if plots:
        for task in sorted(references):
            written.append(plot(rows, references[task], task, f"{prefix}_{task}.png"))
        averaged, reference = average_rows(rows, references)
        if len(references) > 1 and averaged:  # the survey's average score over tasks
            written.append(plot(averaged, reference, "average", f"{prefix}_average.png"))
    return {
        "rows": rows,
        "references": references,
        "table": markdown,
        "written": written,
        "summaries": summaries,
    }
