"""A run's train programs, one per padded length, compiled before its first step in parallel."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from jaxcompress.data import glue as data
from jaxcompress.train import sharding

log = logging.getLogger(__name__)

TOKEN_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def padded_lengths(
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    sort_window: int,
    buckets: Sequence[int],
    steps: range,
) -> list[int]:
    """The padded lengths of the train batches of `steps`, in the order they first come.

    Args:
      lengths: tokens of each train example.
      batch_size, seed, sort_window: as the run's `data.epoch_batches` takes them.
      buckets: the run's padded lengths.
      steps: the steps whose batches count.

    Returns:
      Each padded length that some batch of `steps` has, once.
    """
    per_epoch = len(lengths) // batch_size
    seen: dict[int, None] = {}
    epochs = range(steps.start // per_epoch, (steps.stop - 1) // per_epoch + 1) if steps else ()
    for epoch in epochs:
        batches = data.epoch_batches(lengths, batch_size, seed, epoch, sort_window)
        first = max(steps.start - epoch * per_epoch, 0)
        last = min(steps.stop - epoch * per_epoch, per_epoch)
        for indices in batches[first:last]:
            seen.setdefault(data.bucket_length(int(lengths[indices].max()), buckets))
    return list(seen)


def batch_like(batch: dict, length: int) -> dict:
    """Shapes, dtypes and shardings of `batch` (a global batch) padded to `length` tokens."""
    return {
        k: jax.ShapeDtypeStruct(
            (v.shape[0], length) if k in TOKEN_KEYS else v.shape, v.dtype, sharding=v.sharding
        )
        for k, v in batch.items()
    }


def compile_programs(
    step: Callable,
    mesh: Mesh,
    args_of: Callable[[int], tuple],
    lengths: Sequence[int],
    threads: int | None = None,
) -> dict[int, Callable]:
    """Compile `step` (a jitted function) for each padded length, in parallel threads.

    Tracing and lowering run one after another (they hold Python's lock); XLA compiles the
    programs side by side, which on a GPU or TPU host saves most of the tens of seconds each
    takes alone.

    Args:
      step: the jitted train step (not yet wrapped in the mesh context).
      mesh: the run's mesh; tracing happens with it and the logical axis rules in force.
      args_of: the arguments (arrays or `jax.ShapeDtypeStruct`s) of a step at a length.
      lengths: the padded lengths to compile.
      threads: compiling threads; None: one per program, at most the CPU count.

    Returns:
      The compiled program of each length, callable with that length's arguments.
    """
    if not lengths:
        return {}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        lowered = [step.lower(*args_of(n)) for n in lengths]
    workers = threads or min(len(lowered), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        compiled = list(pool.map(lambda low: low.compile(), lowered))
    log.info(
        "compiled the train step for %d padded lengths (%s) in %.1f s, %d at a time",
        len(lengths),
        ", ".join(map(str, lengths)),
        time.perf_counter() - t0,
        workers,
    )
    return dict(zip(lengths, compiled, strict=True))
