"""A run directory: resolved config, metrics.jsonl, summary.json."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ml_collections

from jaxcompress.config import config_from_json
from jaxcompress.errors import UserError
from jaxcompress.models.artefact import write_json
from jaxcompress.train import provenance


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


log = logging.getLogger(__name__)

# Config keys (dotted for nested ones) a run may change when it resumes: where it runs and
# how often it reports or saves, never what it computes. (`eval.every_steps` only adds
# intermediate eval rows; evaluation changes no parameter or random number.)
PLACEMENT_KEYS = (
    "mesh",
    "distributed",
    "compile_cache",
    "precompile",
    "log_every",
    "checkpoint_every",
    "checkpoint_keep",
    "eval.every_steps",
)
# Resumable too unless the config has transforms or cached teacher logits: then it sets the
# batches data-driven transforms measure and the batches teacher logits are computed in.
EVAL_BATCH_KEY = "eval.batch_size"


class ConfigMismatchError(UserError, ValueError):
    """A workdir holds a run whose config differs in a key that changes results."""


class RunDir:
    """Owns the files of one run; refuses to mix two different configs in one directory.

    A saved config differing only in `PLACEMENT_KEYS` (see `resumable_keys`) is replaced by
    the new one; so is any saved config of a run that has neither a checkpoint nor a summary
    (it failed before saving anything worth keeping). With `write=False` (every process of a
    multi-host run but the first, or a check of a finished run) it checks but writes nothing.
    """

    def __init__(
        self, path: str | os.PathLike, config: ml_collections.ConfigDict, write: bool = True
    ):
        self.path = Path(path)
        self.write = write
        if write:
            self.path.mkdir(parents=True, exist_ok=True)
        resolved = _resolved(config)
        config_file = self.path / "config.json"
        finished = (self.path / "summary.json").exists()
        if config_file.exists():
            previous = json.loads(config_file.read_text())
            keys = resumable_keys(resolved)
            placed = _placed(resolved, keys)
            if placed in (_placed(previous, keys), _upgraded(previous, keys)):
                if write and not finished and previous != resolved:  # goes on with new settings
                    log.info("%s: reporting or placement settings changed", self.path)
                    write_json(config_file, resolved)
            elif not finished and not has_checkpoint(self.path):
                if write:
                    log.info("%s: no checkpoint yet, so its config is replaced", self.path)
                    write_json(config_file, resolved)
            else:
                changed = _changed(previous, resolved)
                raise ConfigMismatchError(
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

    def drop_rows_after(self, step: int, final_eval: bool = False) -> None:
        """Removes metrics.jsonl rows of steps after `step` (and, with `final_eval`, the eval
        row at `step`: the run evaluates it again), so a resumed run logs each step once."""

        def keep(row: dict) -> bool:
            at = row.get("step", -1)
            return at < step or (at == step and not (final_eval and "eval" in row))

        metrics_file = self.path / "metrics.jsonl"
        if not self.write or not metrics_file.exists():
            return
        lines = metrics_file.read_text().splitlines()
        kept = [line for line in lines if line.strip() and keep(json.loads(line))]
        if len(kept) != len(lines):
            tmp = metrics_file.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(metrics_file)

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


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows `RunDir.log` wrote to the run directory `path`'s metrics.jsonl, in order.

    Args:
      path: a run directory.

    Returns:
      One dict per logged row (train rows have `loss`, eval rows `eval`); [] if none.
    """
    metrics_file = Path(path) / "metrics.jsonl"
    if not metrics_file.exists():
        return []
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]


def resumable_keys(resolved: dict) -> tuple[str, ...]:
    """The dotted keys a resumed run of `resolved` may change: `PLACEMENT_KEYS`, and
    `eval.batch_size` where it cannot change results."""
    uses_eval_batches = resolved.get("transforms") or resolved.get("distill", {}).get(
        "cache_logits"
    )
    return PLACEMENT_KEYS + (() if uses_eval_batches else (EVAL_BATCH_KEY,))


def has_checkpoint(path: Path) -> bool:
    """Whether the run in `path` has saved a checkpoint step."""
    folder = path / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _placed(resolved: dict, keys: tuple[str, ...] = PLACEMENT_KEYS, prefix: str = "") -> dict:
    """A resolved config without `keys` (dotted for nested ones)."""
    return {
        k: _placed(v, keys, f"{prefix}{k}.") if isinstance(v, dict) else v
        for k, v in resolved.items()
        if f"{prefix}{k}" not in keys
    }


def _changed(previous: dict, resolved: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ."""
    changed = []
    for k in sorted(set(previous) | set(resolved)):
        a, b = previous.get(k), resolved.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            changed.append(f"{prefix}{k}")
    return changed


def _upgraded(saved: dict, keys: tuple[str, ...] = PLACEMENT_KEYS) -> dict:
    """A saved config read under today's schema (keys added since take their defaults),
    without `keys`."""
    try:
        return _placed(_resolved(config_from_json(saved)), keys)
    except (KeyError, TypeError, ValueError):
        return _placed(saved, keys)


def _resolved(config: ml_collections.ConfigDict) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=_jsonable))
