"""Which padded lengths a run compiles ahead, and the shapes it compiles them for."""

import jax
import numpy as np

from jaxcompress.data import glue as data
from jaxcompress.train import precompile

BUCKETS = (8, 16, 32, 64)


def lengths_by_batch(lengths, steps: range, size=4, seed=3, window=2) -> list[int]:
    """The loop's way: each step's batch, padded to its bucket."""
    per_epoch = len(lengths) // size
    out = []
    for step in steps:
        epoch, position = divmod(step, per_epoch)
        indices = data.epoch_batches(lengths, size, seed, epoch, window)[position]
        out.append(data.bucket_length(int(lengths[indices].max()), BUCKETS))
    return out


def test_padded_lengths_are_those_of_the_steps_batches_in_first_come_order():
    lengths = np.random.default_rng(0).integers(2, 64, 50)  # 12 batches of 4 an epoch
    for steps in (range(0, 12), range(5, 30), range(13, 14), range(0, 0)):
        expected = list(dict.fromkeys(lengths_by_batch(lengths, steps)))
        got = precompile.padded_lengths(lengths, 4, 3, 2, BUCKETS, steps)
        assert got == expected, steps
    short = np.full(50, 12)  # every batch pads to 16: one program, not four
    assert precompile.padded_lengths(short, 4, 3, 2, BUCKETS, range(36)) == [16]


def test_batch_like_pads_token_arrays_only():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    batch = {
        "input_ids": jax.device_put(np.zeros((4, 16), np.int32), sharding),
        "attention_mask": jax.device_put(np.zeros((4, 16), np.int32), sharding),
        "token_type_ids": jax.device_put(np.zeros((4, 16), np.int32), sharding),
        "labels": jax.device_put(np.zeros((4,), np.int32), sharding),
        "teacher_logits": jax.device_put(np.zeros((4, 16), np.float32), sharding),
    }
    like = precompile.batch_like(batch, 64)
    assert like["input_ids"].shape == like["attention_mask"].shape == (4, 64)
    assert like["token_type_ids"].shape == (4, 64) and like["labels"].shape == (4,)
    assert like["teacher_logits"].shape == (4, 16) and like["teacher_logits"].dtype == np.float32
    assert like["input_ids"].sharding == sharding
