"""Benchmark result files (`benchmarks/results/<name>.json` with provenance) and tables."""

from __future__ import annotations

import datetime
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxcompress.models.artefact import write_json
from jaxcompress.train import provenance


def write_result(path: str | os.PathLike, benchmark: str, body: dict) -> Path:
    """Write a result file: the command that made it, commit, date, machine, then `body`."""
    record = {
        "benchmark": benchmark,
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "commit": provenance.git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": provenance.machine(),
        "packages": provenance.package_versions(),
        **body,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, record)
    return target


def markdown_table(rows: Sequence[dict], columns: Sequence[str], fmt: Callable = str) -> str:
    """A Markdown table: one row per dict, one column per key (missing keys blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
