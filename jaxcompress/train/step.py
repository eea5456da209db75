"""The train state, the optimizer and the jitted train step."""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import optax
from flax import struct
from flax.training.dynamic_scale import DynamicScale

from jaxcompress import core
from jaxcompress.compress.distill.objective import (
    Batch,
    LossFn,
    model_params,
)
from jaxcompress.compress.method import Plan, Rate
from jaxcompress.train import grads

log = logging.getLogger(__name__)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw key data (uint32); the step's dropout key is fold_in(key, step)
    loss_scale: Any = ()  # a DynamicScale when the compute dtype is float16


def new_rng(seed: int, impl: str = "rbg") -> jax.Array:
    """Raw key data for `TrainState.rng` (raw, so checkpoints store plain integers)."""
    return jax.random.key_data(jax.random.key(seed, impl=impl))


def make_optimizer(
    train: ml_collections.ConfigDict,
    total_steps: int,
    not_weights: tuple[str, ...] = (),
    rates: dict[str, Rate] | None = None,
) -> optax.GradientTransformation:
    """AdamW with linear warmup and linear decay, global-norm clipping.

    Args:
      train: the config's `train` section (lr, warmup_ratio, weight_decay, clip_norm, b1, b2,
        eps).
      total_steps: the run's steps (the schedule decays to 0 at the last).
      not_weights: key suffixes of leaves with no weight decay (training-time methods'
        extras such as LSQ step sizes or movement scores: they are not weights); biases and
        LayerNorm scales have none either.
      rates: {key suffix: `Rate`} of leaves trained at their own rate or by their own rule
        (methods' extras: `TrainingMethod.extra_rates`).

    Returns:
      The optax transformation.
    """
    warmup = int(round(train.warmup_ratio * total_steps))
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, train.lr, max(warmup, 1)),
            optax.linear_schedule(train.lr, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: (
                path[-1].key not in ("bias", "scale")
                and not str(path[-1].key).endswith(not_weights)
            ),
            params,
        )

    def suffix_mask(suffixes: tuple[str, ...], inverse: bool = False):
        return lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: str(path[-1].key).endswith(suffixes) != inverse, params
        )

    rates = sorted((rates or {}).items())
    summed = tuple(suffix for suffix, rate in rates if rate.rule == "sum")
    adamw = optax.adamw(
        schedule,
        b1=train.b1,
        b2=train.b2,
        eps=train.eps,
        weight_decay=train.weight_decay,
        mask=decay_mask,
    )
    own = [  # a masked-out leaf passes its update through: summed leaves get the gradient
        optax.masked(
            optax.scale(-rate.lr if rate.rule == "sum" else rate.lr / train.lr),
            suffix_mask((suffix,)),
        )
        for suffix, rate in rates
    ]
    return optax.chain(
        optax.clip_by_global_norm(train.clip_norm),
        optax.masked(adamw, suffix_mask(summed, inverse=True)) if summed else adamw,
        *own,
    )


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    rng_impl: str = "rbg",
    plans: tuple[Plan, ...] | None = None,
    grad_accum: int = 1,
    out_shardings: Any = None,
):
    """A jitted `(state, batch, teacher_params) -> (state, metrics)` that donates the state.

    `rng_impl` is the PRNG of `state.rng`: "rbg" (XLA's RngBitGenerator) makes dropout masks
    several times cheaper on CPU than the default threefry; both are deterministic.
    With `plans` (the run's training-time methods, whose chained reparam `tx` holds by
    `core.with_reparam`), the loss sees `core.reparam_apply(params, opt_state)` plus each
    plan's penalty, and each plan's metrics are reported. `grad_accum` > 1 accumulates
    gradients over that many micro-batches (`grads`). A state holding a `DynamicScale`
    (float16) scales the loss and skips steps whose gradients are not finite.
    `out_shardings` (of `(state, metrics)`) keeps a sharded state's layout.
    """
    penalties = [p.penalty for p in plans or () if p.penalty is not None]

    def step(state: TrainState, batch: Batch, teacher_params=None):
        key = jax.random.wrap_key_data(state.rng, impl=rng_impl)
        rng = jax.random.fold_in(key, state.step)
        scaling = isinstance(state.loss_scale, DynamicScale)

        def objective(params, micro_batch, micro_rng):
            seen = params if plans is None else core.reparam_apply(params, state.opt_state)
            loss, aux = loss_fn(seen, micro_batch, micro_rng, teacher_params)
            for penalty in penalties:
                term, logged = penalty(model_params(params))
                loss, aux = loss + term, {**aux, **logged}
            return loss, aux

        scale = state.loss_scale.scale if scaling else None
        grad_fn = grads.value_and_grad(objective, grad_accum, scale)
        (loss, aux), grad = grad_fn(state.params, batch, rng)
        updates, opt_state = tx.update(grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if plans is not None:
            states = core.reparam_state(opt_state).state
            for plan, method_state in zip(plans, states, strict=True):
                if plan.metrics is not None:
                    aux = {**aux, **plan.metrics(method_state)}
        if scaling:  # a step with overflowing gradients changes only the step and the scale
            finite = grads.all_finite(grad)
            new = grads.keep_if(finite, new, state).replace(
                step=new.step, loss_scale=grads.next_loss_scale(state.loss_scale, finite)
            )
            aux = {**aux, "loss_scale": state.loss_scale.scale, "finite": finite}
        norms = {"grad_norm": optax.tree.norm(grad), "param_norm": optax.tree.norm(new.params)}
        return new, {"loss": loss, **norms, **aux}

    return jax.jit(step, donate_argnums=0, out_shardings=out_shardings)
