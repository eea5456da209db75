"""A run's train and eval programs, one per batch shape, compiled before its first step in
parallel threads."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence
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


def eval_lengths(lengths: np.ndarray, batch_size: int, buckets: Sequence[int]) -> list[int]:
    """The padded lengths of `data.eval_batches` over a split, in the order they come.

    Args:
      lengths: tokens of each example of the split.
      batch_size: the eval batch size.
      buckets: the run's padded lengths.

    Returns:
      Each padded length of some eval batch, once.
    """
    order = np.sort(lengths)
    ends = order[
        np.minimum(np.arange(batch_size, len(order) + batch_size, batch_size), len(order)) - 1
    ]
    return list(dict.fromkeys(data.bucket_length(int(n), buckets) for n in ends))


def batch_like(batch: dict, length: int) -> dict:
    """Shapes, dtypes and shardings (if placed) of `batch` padded to `length` tokens."""
    return {
        k: jax.ShapeDtypeStruct(
            (v.shape[0], length) if k in TOKEN_KEYS else v.shape,
            v.dtype,
            sharding=getattr(v, "sharding", None),
        )
        for k, v in batch.items()
    }


def compile_programs(mesh: Mesh, jobs: dict[Hashable, tuple[Callable, tuple]]) -> dict:
    """Compile each job's program, lowering one after another and compiling in parallel.

    Tracing and lowering hold Python's lock; XLA then compiles the programs side by side,
    which on a GPU or TPU host saves most of the tens of seconds each takes alone.

    Args:
      mesh: the run's mesh; tracing happens with it and the logical axis rules in force.
      jobs: by key, a `lower` method (a jitted function's, or `EvalStep.lower`) and the
        arguments (arrays or `jax.ShapeDtypeStruct`s) to lower it for.

    Returns:
      The compiled program of each key, callable with arguments shaped as its job's.
    """
    if not jobs:
        return {}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        lowered = [lower(*args) for lower, args in jobs.values()]
    workers = min(len(lowered), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        compiled = list(pool.map(lambda low: low.compile(), lowered))
    log.info(
        "compiled %d programs ahead (%s) in %.1f s, %d at a time",
        len(jobs),
        ", ".join(map(str, jobs)),
        time.perf_counter() - t0,
        workers,
    )
    return dict(zip(jobs, compiled, strict=True))
