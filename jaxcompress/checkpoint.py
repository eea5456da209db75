"""Orbax checkpoints of the train state: atomic saves, exact restores."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: str | os.PathLike, keep: int = 2) -> ocp.CheckpointManager:
    """A manager keeping the `keep` latest steps under `directory`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Write `state` for `step` and wait, so a crash right after never leaves a partial step."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> Any | None:
    """The latest saved state, shaped and sharded like `like`; None when there is none."""
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
