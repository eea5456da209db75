"""Plot SST-2 dev accuracy against the share of weights kept, magnitude beside movement pruning.

  python benchmarks/sparsity_curve.py

Reads the `sparsity` sweep's result files (benchmarks/results/sparsity.json: 400 steps;
sparsity_epoch.json: one epoch) and writes benchmarks/results/sparsity_curve.png: one line
per technique over the strengths `r<percent kept>`, with the spread over seeds as error bars,
hollow markers where fewer than 3 seeds finished (the count beside them), longer budgets as
stars (one epoch) or diamonds beside their strength, and the teacher and 95% of it as
horizontal lines.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {
    "magnitude_kd": "magnitude, cubic schedule",
    "movement_ft_once_kd": "movement, scores from the teacher's fine-tune, pruned at once",
    "movement_ft_kd": "movement, same scores, cubic schedule",
}
COLORS = {
    "magnitude_kd": "tab:blue",
    "movement_ft_once_kd": "tab:red",
    "movement_ft_kd": "tab:gray",
}
STRENGTH = re.compile(r"r(\d+)(?:_(\w+))?")


def points(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (technique, budget suffix of the strength, '' for the base budget), each with
    `kept`, the percent of prunable weights its strength keeps, sorted by it."""
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        technique, strength = row["name"].split(" ")
        match = STRENGTH.fullmatch(strength)
        if technique not in LABELS or not match:
            continue
        kept, budget = int(match[1]), match[2] or ""
        series.setdefault((technique, budget), []).append({**row, "kept": kept})
    return {key: sorted(rows, key=lambda r: r["kept"]) for key, rows in series.items()}


def plot(files: list[Path], out: Path) -> Path:
    """The curve of every technique in the result `files` (same teacher) into `out`."""
    results = [json.loads(f.read_text()) for f in files]
    teacher = results[0]["teacher"]
    rows = [row for result in results for row in result["rows"]]
    by_series = points(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    shift = {}  # longer budgets of one strength sit side by side, not on top of each other
    for (technique, budget), series in sorted(by_series.items()):
        nudge = 1.0
        if budget:
            shift[series[0]["kept"]] = shift.get(series[0]["kept"], 0) + 1
            nudge = 1.07 ** -shift[series[0]["kept"]]
        xs = [r["kept"] * nudge for r in series]
        ys = [r["value"] for r in series]
        errs = [r["std"] if r["seeds"] > 1 else 0.0 for r in series]
        label = f"{LABELS[technique]}, {series[0]['steps']:,} steps"
        color = COLORS[technique]
        marker = {"": "o", "epoch": "*"}.get(budget, "D")
        ax.errorbar(
            xs,
            ys,
            yerr=errs,
            color=color,
            marker=marker,
            markersize={"o": 6, "*": 11}.get(marker, 6),
            linestyle="none" if budget or len(xs) == 1 else "-",
            capsize=3,
            label=label,
        )
        for x, r in zip(xs, series, strict=True):
            if r["seeds"] < 3:  # no claim: hollow, and the seed count beside it
                ax.plot(x, r["value"], marker, color="white", markersize=3)
                ax.annotate(
                    f"n={r['seeds']}",
                    (x, r["value"]),
                    xytext=(5, -10),
                    textcoords="offset points",
                    fontsize=7,
                    color=color,
                )
    value = teacher["value"]
    ax.axhline(value, color="black", linewidth=1, label=f"teacher ({value:.4f})")
    ax.axhline(0.95 * value, color="black", linestyle=":", label="95% of the teacher")
    ax.set_ylim(top=value + 0.01)
    ax.set_xscale("log")
    ticks = sorted({r["kept"] for series in by_series.values() for r in series})
    ax.set_xticks(ticks, [f"{t}%" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights of the encoder's dense kernels kept (log scale)")
    ax.set_ylabel(f"SST-2 dev {teacher['metric']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--results",
        nargs="+",
        default=[str(RESULTS / "sparsity.json"), str(RESULTS / "sparsity_epoch.json")],
    )
    parser.add_argument("--out", default=str(RESULTS / "sparsity_curve.png"))
    args = parser.parse_args()
    print(plot([Path(f) for f in args.results], Path(args.out)))


if __name__ == "__main__":
    main()
