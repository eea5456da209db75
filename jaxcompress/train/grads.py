"""Gradients of one train step: micro-batch accumulation and dynamic loss scaling (float16)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax.training.dynamic_scale import DynamicScale

# (params, batch, rng) -> (loss, aux); aux a dict of scalars.
Objective = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def micro_batches(batch: dict, count: int) -> dict:
    """`batch` as `count` micro-batches stacked on a new leading axis. Micro-batch j holds
    rows j, j + count, ...: rows are split over devices in contiguous blocks, so every
    micro-batch keeps a share of rows on every device."""
    rows = len(batch["example_mask"])
    if rows % count:
        raise ValueError(f"batch of {rows} rows does not split into {count} micro-batches")

    def split(x):
        return x.reshape(rows // count, count, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def value_and_grad(objective: Objective, accumulate: int = 1, scale: jax.Array | None = None):
    """`(params, batch, rng) -> ((loss, aux), grads)` of `objective`.

    With `accumulate` > 1 the batch runs as that many micro-batches, one at a time
    (`lax.scan`), and loss, aux and gradients are their means weighted by real examples: the
    full batch's values when the loss is a mean over examples. Micro-batch j's dropout key is
    fold_in(rng, j). With `scale`, gradients are those of scale * loss, divided by scale
    afterwards (float16 loss scaling); they may then be non-finite.
    """

    def scaled(params, batch, rng):
        loss, aux = objective(params, batch, rng)
        return loss if scale is None else loss * scale, (loss, aux)

    grad_fn = jax.value_and_grad(scaled, has_aux=True)

    def unscale(grads):
        return grads if scale is None else jax.tree.map(lambda g: g / scale, grads)

    def single(params, batch, rng):
        (_, (loss, aux)), grads = grad_fn(params, batch, rng)
        return (loss, aux), unscale(grads)

    if accumulate == 1:
        return single

    def accumulated(params, batch, rng):
        micro = micro_batches(batch, accumulate)
        counts = jnp.sum(micro["example_mask"], axis=1)
        weights = counts / jnp.maximum(jnp.sum(counts), 1.0)
        shapes = jax.eval_shape(single, params, jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(total, inputs):
            index, weight, mb = inputs
            out = single(params, mb, jax.random.fold_in(rng, index))
            return jax.tree.map(lambda t, x: t + weight * x, total, out), None

        indices = jnp.arange(accumulate)
        total, _ = jax.lax.scan(body, zeros, (indices, weights, micro))
        return total

    return accumulated


def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def next_loss_scale(dyn: DynamicScale, finite: jax.Array) -> DynamicScale:
    """Flax's `DynamicScale` rule: grow by `growth_factor` after `growth_interval` finite
    steps in a row, shrink by `backoff_factor` (not below `minimum_scale`) on a non-finite
    one. Kept apart from `DynamicScale.value_and_grad` so accumulated gradients use it too."""
    grow = dyn.fin_steps == dyn.growth_interval
    grown = jnp.where(
        grow, jnp.minimum(dyn.scale * dyn.growth_factor, jnp.finfo(jnp.float32).max), dyn.scale
    )
    shrunk = jnp.maximum(dyn.scale * dyn.backoff_factor, dyn.minimum_scale)
    scale = jnp.where(finite, grown, shrunk)
    fin_steps = jnp.where(grow | ~finite, 0, dyn.fin_steps + 1)
    return dyn.replace(fin_steps=fin_steps, scale=scale)


def keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step's gradients were finite, else `old` (a skipped float16 step)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
