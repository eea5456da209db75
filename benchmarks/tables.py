"""Markdown tables from benchmarks/results/*.json, written into the README between markers.

python benchmarks/tables.py --write README.md   # regenerate
python benchmarks/tables.py --check README.md   # fail if the README is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxcompress.experiments.results import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# Columns shown per benchmark; others fall back to the standard row fields of DESIGN.md.
COLUMNS = {
    "sst2_teacher": [
        "name",
        "task",
        "metric",
        "value",
        "relative",
        "train_examples",
        "steps",
        "epochs",
        "tokens_per_s",
        "padding_ratio",
        "wall_s",
    ],
    "train_speed": [
        "name",
        "batch_size",
        "seq_len",
        "train_examples",
        "ours_tokens_per_s",
        "pytorch_tokens_per_s",
        "ours_examples_per_s",
        "pytorch_examples_per_s",
        "ours_padding_ratio",
        "pytorch_padding_ratio",
        "ours_dev_accuracy",
        "pytorch_dev_accuracy",
        "ratio_vs_pytorch",
    ],
}
COLUMNS["albert_family"] = [
    "name",
    "value",
    "std",
    "seeds",
    "before_recovery",
    "relative",
    "params",
    "bytes",
    "bytes_no_embeddings",
    "bytes_relative",
    "bytes_no_embeddings_relative",
    "latency_ratio",
    "compiled_program_chars",
    "steps",
]
COLUMNS["distill"] = [
    "name",
    "value",
    "std",
    "seeds",
    "relative",
    "layers",
    "hidden_size",
    "params",
    "params_relative",
    "bytes",
    "latency_ratio",
    "steps",
]
COLUMNS["quantize"] = [
    "name",
    "bits",
    "value",
    "std",
    "seeds",
    "relative",
    "bytes",
    "bytes_no_embeddings",
    "compression",
    "compression_no_embeddings",
    "latency_ratio",
    "commit",
    "cpu",
]
COLUMNS["throughput"] = [
    "name",
    "device",
    "dtype",
    "batch_size",
    "step_ms",
    "tokens_per_s",
    "achieved_tflops",
    "peak_tflops",
    "peak_source",
    "mfu",
    "pytorch_tokens_per_s",
    "ratio_vs_pytorch",
    "commit",
]
COLUMNS["dynamic"] = [
    "name",
    "value",
    "relative",
    "mean_layers",
    "speedup",
    "speedup_b32_l128",
    "teacher_dev_s",
    "dev_s",
    "token_keep",
]
COLUMNS["movement_scores"] = [
    "name",
    "steps_trained",
    "chance",
    "seed_vs_seed",
    "seed_vs_seed_min",
    "seed_vs_seed_max",
    "scores_vs_magnitude",
    "matrices",
]
STANDARD = [
    "name",
    "task",
    "metric",
    "value",
    "std",
    "seeds",
    "relative",
    "params",
    "bytes",
    "bytes_no_embeddings",
    "latency_ratio",
    "train_examples",
    "steps",
    "wall_s",
]


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value)


def table(result: dict) -> str:
    rows = result["rows"]
    wanted = COLUMNS.get(result["benchmark"], STANDARD)
    columns = [c for c in wanted if any(c in r for r in rows)]
    cells = [{c: r.get(c) for c in columns} for r in rows]
    for cell in cells:  # rows carried from an earlier measurement name its commit
        if cell.get("commit"):
            cell["commit"] = cell["commit"][:12]
    body = markdown_table(cells, columns, fmt)
    if "table" in result:  # a report's own layout (sweeps: the survey's Table 1), and plots
        body = result["table"]
        body += "".join(f"\n\n![{p}](benchmarks/results/{p})" for p in result.get("plots", ()))
    machine = result.get("machine", {})
    where = f"{machine.get('cpu')} ({machine.get('cores')} cores), gpu: {machine.get('gpu')}"
    header = f"### {result['benchmark']}\n\n`{result['command']}`  \n{where}; commit "
    header += f"`{(result.get('commit') or 'unknown')[:12]}`, {result.get('date')}"
    teacher = result.get("teacher")
    if teacher:
        header += f"  \nteacher: {teacher['model']}, {teacher['metric']} {fmt(teacher['value'])}"
    return header + "\n\n" + body


def render(results_dir: Path = RESULTS) -> str:
    files = sorted(results_dir.glob("*.json"))
    sections = [table(json.loads(f.read_text())) for f in files]
    return "\n\n".join(sections) if sections else "(no results yet)"


def splice(readme: str, body: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="README")
    mode.add_argument("--check", metavar="README")
    args = parser.parse_args()
    path = Path(args.write or args.check)
    current = path.read_text()
    updated = splice(current, render())
    if args.write:
        path.write_text(updated)
        return 0
    if updated != current:
        print(f"{path} is out of date: run python benchmarks/tables.py --write {path}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
