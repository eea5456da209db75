"""The run summaries of a sweep: their format version, and reading one back."""

from __future__ import annotations

import json
from pathlib import Path

from jaxcompress.errors import UserError

FORMAT = 1  # of run summaries; bump when their meaning changes


class SummaryFormatError(UserError, ValueError):
    """A run summary written under another summary format."""


def read_run_summary(path: Path) -> dict:
    """A run's summary.json; one written under another summary format is refused."""
    summary = json.loads(path.read_text())
    if summary.get("format") != FORMAT:
        raise SummaryFormatError(
            f"{path} was written by sweep format {summary.get('format')!r}; this jaxcompress "
            f"reads format {FORMAT}. Rerun the sweep into a new workdir or use the matching "
            "jaxcompress version."
        )
    return summary
