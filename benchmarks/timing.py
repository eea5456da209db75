"""Step timing shared by the speed benchmarks: a fixed random batch and a median step time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def random_batch(
    batch_size: int, length: int, num_labels: int = 2, seed: int = 0
) -> dict[str, np.ndarray]:
    """A full-length batch (no padding) of random token ids and labels, as the train step reads."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1000, 30000, (batch_size, length)).astype(np.int32),
        "attention_mask": np.ones((batch_size, length), np.int32),
        "token_type_ids": np.zeros((batch_size, length), np.int32),
        "labels": rng.integers(0, num_labels, batch_size).astype(np.int32),
        "example_mask": np.ones(batch_size, np.float32),
    }


def median_seconds(step: Callable[[], object], steps: int, warmup: int = 3) -> float:
    """Median wall seconds of `step()` over `steps` calls after `warmup` untimed ones
    (compilation happens in those); `step` must return only once its work is done."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
