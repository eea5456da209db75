"""Wall-clock inference latency of a (config, params) on the device at hand."""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.models.bert import Bert, BertConfig
from jaxcompress.train.progress import Progress

log = logging.getLogger(__name__)


def jitted_forward(model) -> Callable:
    """`(params, ids, mask) -> logits` of anything with a Flax-style `apply`, jitted."""
    return jax.jit(lambda p, x, m: model.apply({"params": p}, x, m).logits)


@functools.lru_cache(maxsize=32)
def _forward(config: BertConfig):
    """One jitted forward per config, so repeated measurements reuse the compiled program."""
    return jitted_forward(Bert(config))


def compiled_program_size(config: BertConfig, params: dict, seq_len: int = 128) -> int:
    """Characters of the optimized HLO of the jitted forward: what sharing a layer saves."""
    ids = jnp.ones((1, seq_len), jnp.int32)
    return len(_forward(config).lower(params, ids, ids).compile().as_text())


def inference_latency(
    config: BertConfig,
    params: dict,
    batch_size: int = 32,
    seq_len: int = 128,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """Median and spread of seconds per jitted forward pass on a full (unpadded) batch."""
    ids = jax.random.randint(jax.random.key(0), (batch_size, seq_len), 1000, 29000)
    mask = jnp.ones_like(ids)
    forward = _forward(config)
    bar = Progress(log, f"latency {batch_size} x {seq_len}", warmup + repeats, "pass")
    for _ in range(warmup):
        jax.block_until_ready(forward(params, ids, mask))
        bar.update()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, ids, mask))
        times.append(time.perf_counter() - t0)
        bar.update()
    bar.close()
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }


def paired_latency(
    reference: tuple[Any, dict],
    model: tuple[Any, dict],
    batch_size: int = 32,
    seq_len: int = 128,
    rounds: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """Latency of `model` against `reference`, timed alternately in the same process.

    On a shared machine slow spells last seconds; alternating the two forwards makes both see
    them, and the median of per-round ratios discards the rounds they hit unevenly. Each of
    the two is `(BertConfig, params)` or `(model with a Flax-style apply, params)`.
    """
    ids = jax.random.randint(jax.random.key(0), (batch_size, seq_len), 1000, 29000)
    mask = jnp.ones_like(ids)
    pairs = [
        (_forward(m) if isinstance(m, BertConfig) else jitted_forward(m), params)
        for m, params in (reference, model)
    ]

    def timed(forward, params) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, ids, mask))
        return time.perf_counter() - t0

    bar = Progress(log, f"paired latency {batch_size} x {seq_len}", warmup + rounds, "round")
    for _ in range(warmup):
        for forward, params in pairs:
            timed(forward, params)
        bar.update()
    times = []
    for _ in range(rounds):
        times.append([timed(f, p) for f, p in pairs])
        bar.update()
    bar.close()
    return {
        "latency_s": statistics.median(t[1] for t in times),
        "reference_latency_s": statistics.median(t[0] for t in times),
        "speedup": statistics.median(t[0] / t[1] for t in times),
        "rounds": rounds,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }
