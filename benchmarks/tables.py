"""Markdown tables from benchmarks/results/*.json, written into Markdown files between markers.

Between the results markers go every benchmark's tables (docs/results.md); between the
summary markers, a table of a few headline rows (README.md).

python benchmarks/tables.py --write docs/results.md README.md   # regenerate (make tables)
python benchmarks/tables.py --check docs/results.md README.md   # fail if one is out of date
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxcompress.experiments.results import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"
RESULTS_PAGE = RESULTS.parents[1] / "docs" / "results.md"

# The summary's rows: (result file's benchmark, row name, what the row is).
HEADLINES = [
    ("quantize", "ptq_w8a8", "post-training W8A8, calibrated"),
    ("quantize", "int8_execution_w8a8_static", "W8A8 run on int8 matmuls, calibrated scales"),
    ("quantize", "gobo_w3_e4", "GOBO: 3-bit weights, 4-bit embeddings, no data"),
    ("quantize", "qat_weights w4_group", "QAT: 4-bit group-wise weights"),
    ("quantize", "qat_ternary_kd w2a8_epoch", "TernaryBERT: ternary weights and embeddings"),
    ("quantize", "qat_binary_tws w1a8_tws_epoch", "BinaryBERT: its split, binary weights"),
    ("prune", "magnitude_kd s50", "magnitude pruning, 50% (sparse artefact)"),
    ("sparsity", "movement_ft_once_kd r10", "movement pruning, 10% of weights kept (sparse)"),
    ("sparsity", "magnitude_kd r10", "magnitude pruning, 10% of weights kept (sparse)"),
    ("prune", "heads_kd h50", "half the attention heads removed"),
    ("prune", "combined_kd l3_h50_f50", "3 layers, half the heads, half the FFN"),
    (
        "combined_staged",
        "combined_staged l3_h50_f50_all",
        "the same, 3 layers by TinyBERT's terms first",
    ),
    ("ablation_main_sst2", "factorize e128", "ALBERT's factorized embeddings, E = 128"),
    ("ablation_main_sst2", "low_rank_ffn r50", "low-rank FFN, half rank"),
    ("ablation_main_sst2", "layer_drop_kd l3", "3 of 6 layers, logit distillation"),
    ("distill", "l3,tinybert,long", "3 layers, TinyBERT distillation, 1,200 steps"),
    ("dynamic", "exits_labels_mean entropy=0.4", "early exit (DeeBERT, mean-pooled heads)"),
    ("dynamic", "power_mild", "PoWER-BERT token elimination"),
]

# Columns shown per benchmark; others fall back to the standard row fields of DESIGN.md.
COLUMNS = {
    "glue_teachers": [
        "task",
        "name",
        "metric",
        "value",
        "hf_pytorch_value",
        "eval",
        "seed_spread",
        "steps",
        "train_s",
        "tokens_per_s",
        "dev_examples",
    ],
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
    "score_update",
    "steps_trained",
    "chance",
    "seed_vs_seed",
    "seed_vs_seed_min",
    "seed_vs_seed_max",
    "scores_vs_magnitude",
    "matrices",
]
COLUMNS["movement_oneshot"] = ["name", "ranking", "sparsity", "value", "relative", "dev_examples"]
COLUMNS["compile_time"] = [
    "name",
    "device",
    "shape",
    "layers",
    "scan_layers",
    "batch_size",
    "seq_len",
    "train_step_s",
    "eval_step_s",
    "lengths",
    "one_by_one_s",
    "ahead_parallel_s",
    "value",
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
    """A table cell: floats to 4 decimals (or 1 from 10 on), ints with thousands commas."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value)


def table(result: dict, plots_dir: str = "benchmarks/results") -> str:
    """One benchmark's section: its command, machine, commit, date and table (and plots,
    linked from `plots_dir`, the results folder relative to the file the table goes in)."""
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
        body += "".join(f"\n\n![{p}]({plots_dir}/{p})" for p in result.get("plots", ()))
    machine = result.get("machine", {})
    where = f"{machine.get('cpu')} ({machine.get('cores')} cores), gpu: {machine.get('gpu')}"
    header = f"### {result['benchmark']}\n\n`{result['command']}`  \n{where}; commit "
    header += f"`{(result.get('commit') or 'unknown')[:12]}`, {result.get('date')}"
    teacher = result.get("teacher")
    if teacher:
        header += f"  \nteacher: {teacher['model']}, {teacher['metric']} {fmt(teacher['value'])}"
    return header + "\n\n" + body


def render(results_dir: Path = RESULTS, target: Path | None = None) -> str:
    """Every result file's section, in file-name order; plot links are relative to the
    folder of `target` (the repository root if None)."""
    files = sorted(results_dir.glob("*.json"))
    folder = target.resolve().parent if target is not None else results_dir.parents[1]
    plots_dir = Path(os.path.relpath(results_dir, folder)).as_posix()
    sections = [table(json.loads(f.read_text()), plots_dir) for f in files]
    return "\n\n".join(sections) if sections else "(no results yet)"


def _size(row: dict, teacher: dict) -> str:
    if row.get("bytes_relative") is not None:
        return f"{100 * row['bytes_relative']:.1f}"
    if row.get("bytes") and teacher.get("bytes"):
        return f"{100 * row['bytes'] / teacher['bytes']:.1f}"
    return "–"


def _speedup(row: dict) -> str:
    ratio = row.get("latency_ratio") or {}
    value = ratio.get("cpu") if isinstance(ratio, dict) else ratio
    value = row.get("speedup") if value is None else value
    return "–" if value is None else f"{value:.2f}x"


def summary(results_dir: Path = RESULTS, target: Path | None = None) -> str:
    """The HEADLINES rows as one table: dev accuracy (x100; mean ± std over n seeds), saved
    bytes as % of the teacher's, CPU speed-up over the teacher, and a link to each row's
    table in docs/results.md (relative to the folder of `target`, the repository root if
    None). Raises ValueError if a headline row is missing from its result file."""
    results = {}
    for f in sorted(results_dir.glob("*.json")):
        result = json.loads(f.read_text())
        results[result["benchmark"]] = result
    folder = target.resolve().parent if target is not None else results_dir.parents[1]
    page = Path(os.path.relpath(RESULTS_PAGE, folder)).as_posix()
    teacher = next(r["teacher"] for r in results.values() if r.get("teacher", {}).get("bytes"))
    lines = [
        "| method | SST-2 dev accuracy | size % | CPU speed-up | table |",
        "|---|---|---|---|---|",
        f"| teacher ({teacher['model']}) | {100 * teacher['value']:.2f} | 100 | 1.00x | |",
    ]
    for benchmark, name, what in HEADLINES:
        rows = {r["name"]: r for r in results.get(benchmark, {}).get("rows", ())}
        if name not in rows:
            raise ValueError(f"HEADLINES: no row {name!r} in benchmarks/results/{benchmark}.json")
        row = rows[name]
        accuracy = f"{100 * row['value']:.2f}"
        if row.get("std") is not None:
            accuracy += f" ± {100 * row['std']:.2f}"
        if row.get("seeds"):
            accuracy += f" (n={row['seeds']})"
        size = _size(row, results[benchmark].get("teacher") or {})
        link = f"[{benchmark}]({page}#{benchmark})"
        lines.append(f"| {what} | {accuracy} | {size} | {_speedup(row)} | {link} |")
    return "\n".join(lines)


def splice(document: str, body: str, start: str = START, end: str = END) -> str:
    """`document` with `body` between its `start` and `end` markers."""
    if start not in document or end not in document:
        raise ValueError(f"the file has no {start} ... {end} markers")
    head, rest = document.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update(path: Path) -> str:
    """The text of `path` with its results and/or summary section regenerated."""
    text = path.read_text()
    if START not in text and SUMMARY_START not in text:
        raise ValueError(f"{path} has neither {START} nor {SUMMARY_START} markers")
    if START in text:
        text = splice(text, render(target=path))
    if SUMMARY_START in text:
        text = splice(text, summary(target=path), SUMMARY_START, SUMMARY_END)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="MARKDOWN", nargs="+")
    mode.add_argument("--check", metavar="MARKDOWN", nargs="+")
    args = parser.parse_args()
    stale = []
    for path in map(Path, args.write or args.check):
        updated = update(path)
        if args.write:
            path.write_text(updated)
        elif updated != path.read_text():
            stale.append(str(path))
    if stale:
        print(f"out of date: run python benchmarks/tables.py --write {' '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
