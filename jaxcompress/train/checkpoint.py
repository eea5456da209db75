"""Orbax checkpoints of the train state: atomic saves, exact restores."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxcompress.errors import UserError

log = logging.getLogger(__name__)
# Unreadable steps are moved here (beside the checkpoints folder), not deleted.
SKIPPED = "checkpoints_unreadable"


def manager(directory: str | os.PathLike, keep: int = 2) -> ocp.CheckpointManager:
    """A manager keeping the `keep` latest steps under `directory`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Write `state` for `step` and wait, so a crash right after never leaves a partial step."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> Any | None:
    """The latest intact saved state, shaped and sharded like `like`; None when there is none.

    A step that fails to restore (a truncated array file, garbage metadata) is logged as
    skipped and the next newest is tried; once one restores, the unreadable newer ones are
    moved to `checkpoints_unreadable/` beside the folder (so the run can save those steps
    again). If none restores, nothing is moved and UserError names the folder and the fix.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    errors = []
    for step in steps:
        try:
            state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax and tensorstore raise many kinds, some plain Exception
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            errors.append((step, reason))
            path = Path(mngr.directory) / str(step)
            log.warning("checkpoint %s cannot be restored (%s); skipping it", path, reason)
            continue
        if errors:
            _move_aside(mngr, [s for s, _ in errors])
        return state
    tried = "; ".join(f"step {s}: {reason}" for s, reason in errors)
    raise UserError(
        f"no checkpoint in {mngr.directory} can be restored ({tried}); the run "
        f"cannot resume. Delete {mngr.directory} to train from step 0 (or use a new workdir); "
        "if every step fails the same way the config may not match the checkpoints."
    )


def _move_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves unreadable steps out of the manager's folder (process 0) and forgets them."""
    if jax.process_index() == 0:
        stamp = int(time.time())
        for step in steps:
            path = Path(mngr.directory) / str(step)
            if path.exists():
                aside = Path(mngr.directory).parent / SKIPPED / f"{step}-{stamp}"
                aside.parent.mkdir(parents=True, exist_ok=True)
                path.rename(aside)
                log.warning("moved unreadable checkpoint %s to %s", path, aside)
    mngr.reload()
