"""A run directory: resolved config, metrics.jsonl, summary.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ml_collections

from jaxcompress import provenance
from jaxcompress.config import config_from_json


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


# Config keys a run may change when it resumes: where it runs, not what it computes.
PLACEMENT_KEYS = ("mesh", "distributed")


class RunDir:
    """Owns the files of one run; refuses to mix two different configs in one directory.

    With `write=False` (every process of a multi-host run but the first) it checks the
    config but writes nothing."""

    def __init__(
        self, path: str | os.PathLike, config: ml_collections.ConfigDict, write: bool = True
    ):
        self.path = Path(path)
        self.write = write
        if write:
            self.path.mkdir(parents=True, exist_ok=True)
        resolved = _resolved(config)
        config_file = self.path / "config.json"
        if config_file.exists():
            previous = json.loads(config_file.read_text())
            if _placed(previous) != _placed(resolved) and _upgraded(previous) != _placed(resolved):
                changed = sorted(
                    k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k)
                )
                raise ValueError(
                    f"{self.path} holds a run with a different config (keys {changed}); "
                    "use a new workdir or delete it"
                )
        elif write:
            write_json(config_file, resolved)
        self.config = resolved

    def log(self, **record) -> None:
        if not self.write:
            return
        record = {"time": time.time(), **record}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict) -> None:
        if not self.write:
            return
        full = {
            "config": self.config,
            "commit": provenance.git_commit(),
            "packages": provenance.package_versions(),
            "machine": provenance.machine(),
            **summary,
        }
        write_json(self.path / "summary.json", full)


def _placed(resolved: dict) -> dict:
    """A resolved config without its `PLACEMENT_KEYS`."""
    return {k: v for k, v in resolved.items() if k not in PLACEMENT_KEYS}


def _upgraded(saved: dict) -> dict:
    """A saved config read under today's schema (keys added since take their defaults),
    without its placement keys."""
    try:
        return _placed(_resolved(config_from_json(saved)))
    except (KeyError, TypeError, ValueError):
        return _placed(saved)


def _resolved(config: ml_collections.ConfigDict) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=_jsonable))


def write_json(path: Path, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
