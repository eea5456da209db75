"""Unstructured pruning as `core.Reparam`s: magnitude (one-shot, gradual) and movement pruning.

State is a `PruneState`: a boolean mask for every leaf of the trainable tree (a scalar
`True` for leaves no rule selects) and the sparsity (or, for soft movement pruning, the
score threshold) in force. `apply` zeroes pruned weights in the forward pass; `update`
recomputes masks at the schedule's steps (it runs inside the jitted train step). Pair it with
`keep_pruned_zero(optimizer)` so pruned weights get no updates and their moments stay zero.

Schedules follow Zhu & Gupta (2017): the target goes from `initial` to `final` between
`begin_step` and `end_step` along 1 - (1 - t)^power (power 3), recomputed every `frequency`
steps; begin == end is one-shot pruning. Masks keep exactly round((1 - s) * n) weights (ties
by position), per selected leaf (`scope='layer'`) or over all of them (`scope='global'`).

Movement pruning (Sanh et al., 2020) learns a score per weight: scores live in the params
tree beside their weight (key + `SCORE_SUFFIX`) and are trained by the straight-through
estimator, dL/dS = dL/dW' * W, i.e. the accumulated movement -W * dL/dW with the sign of a
gradient. 'hard' keeps the top-scored weights at the scheduled sparsity; 'soft' keeps
weights with sigmoid(S) above a scheduled threshold, with an L1 penalty on sigmoid(S)
(`movement_penalty`) that sets how much is pruned.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress import core

SCORE_SUFFIX = "@movement_score"
SCOPES = ("layer", "global")
MOVEMENT_MODES = ("hard", "soft")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Zhu & Gupta's gradual schedule of a target (sparsity, or soft-movement threshold)."""

    final: float  # the target from end_step on
    initial: float = 0.0  # the target before begin_step
    begin_step: int = 0
    end_step: int = 0  # == begin_step: one-shot at begin_step
    frequency: int = 1  # steps between mask updates inside [begin_step, end_step]
    power: float = 3.0

    def __post_init__(self) -> None:
        if not 0 <= self.begin_step <= self.end_step:
            raise ValueError(f"Schedule: need 0 <= begin_step <= end_step, got {self}")
        if self.frequency < 1:
            raise ValueError(f"Schedule.frequency must be >= 1, got {self.frequency}")

    def value(self, step: jax.Array) -> jax.Array:
        """The target in force after `step` (the last update step at or before it)."""
        step = jnp.asarray(step)
        span = max(self.end_step - self.begin_step, 1)
        last = self.begin_step + (step - self.begin_step) // self.frequency * self.frequency
        last = jnp.clip(last, self.begin_step, self.end_step)
        done = jnp.where(step >= self.end_step, 1.0, (last - self.begin_step) / span)
        target = self.final + (self.initial - self.final) * (1.0 - done) ** self.power
        return jnp.where(step < self.begin_step, self.initial, target)

    def is_update(self, step: jax.Array) -> jax.Array:
        """Whether masks are recomputed at `step`."""
        step = jnp.asarray(step)
        inside = (step >= self.begin_step) & (step <= self.end_step)
        return inside & (((step - self.begin_step) % self.frequency == 0) | (step == self.end_step))


class PruneState(NamedTuple):
    masks: Any  # bool, shaped like the trainable tree; scalar True where nothing is pruned
    target: jax.Array  # sparsity (or soft threshold) of the current masks


def _flat(tree: Any) -> dict[tuple, Any]:
    return flatten_dict(tree, keep_empty_nodes=True)


def _path(key: tuple) -> str:
    return "/".join(map(str, key))


def split_scores(params: core.Params) -> tuple[core.Params, dict[str, jax.Array]]:
    """The params without movement scores, and the scores by their weight's path."""
    flat = _flat(params)
    scores = {
        _path(k[:-1] + (k[-1].removesuffix(SCORE_SUFFIX),)): v
        for k, v in flat.items()
        if str(k[-1]).endswith(SCORE_SUFFIX)
    }
    rest = {k: v for k, v in flat.items() if not str(k[-1]).endswith(SCORE_SUFFIX)}
    return unflatten_dict(rest), scores


def _selected(params: core.Params, rules: core.Rules, name: str) -> dict[str, Any]:
    model, _ = split_scores(params)
    return core.match_rules(model, rules, name=name)


def keep_top(values: dict[str, jax.Array], sparsity: jax.Array, scope: str) -> dict[str, jax.Array]:
    """Boolean masks keeping exactly round((1 - sparsity) * n) of the largest values, per
    entry ('layer') or over all entries together ('global'); ties go to the earlier index."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")

    def top(flat: jax.Array) -> jax.Array:
        n = flat.size
        keep = jnp.round((1.0 - sparsity) * n).astype(jnp.int32)
        order = jnp.argsort(-flat, stable=True)
        rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        return rank < keep

    if scope == "layer":
        return {p: top(v.reshape(-1)).reshape(v.shape) for p, v in values.items()}
    paths = list(values)
    kept = top(jnp.concatenate([values[p].reshape(-1).astype(jnp.float32) for p in paths]))
    out, start = {}, 0
    for p in paths:
        size = values[p].size
        out[p] = kept[start : start + size].reshape(values[p].shape)
        start += size
    return out


def _with_masks(params: core.Params, masks: dict[str, jax.Array]) -> core.Params:
    """A mask tree shaped like `params`: the given masks, scalar True elsewhere."""
    flat = _flat(params)
    return unflatten_dict({k: masks.get(_path(k), jnp.array(True)) for k in flat})


def _masks_by_path(state: PruneState) -> dict[str, jax.Array]:
    return {_path(k): v for k, v in _flat(state.masks).items()}


def zero_pruned(params: core.Params, masks: core.Params) -> core.Params:
    """`params` with every pruned weight set to exactly zero."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def magnitude_pruning(rules: core.Rules, schedule: Schedule, scope: str = "layer") -> core.Reparam:
    """Gradual (or one-shot) magnitude pruning of the weights `rules` select (spec: True).

    Pruned weights stay pruned: later masks rank only the weights still kept.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")

    def masks_for(params, state, target):
        selected = _selected(params, rules, "prune")
        old = _masks_by_path(state)
        flat = {_path(k): v for k, v in _flat(params).items()}
        magnitude = {p: jnp.where(old[p], jnp.abs(flat[p]), -1.0) for p in selected}
        return _with_masks(params, keep_top(magnitude, target, scope))

    def init(params):
        selected = _selected(params, rules, "prune")
        ones = {p: jnp.ones(jnp.shape(w), bool) for p, w in _by_path(params, selected).items()}
        state = PruneState(_with_masks(params, ones), jnp.zeros((), jnp.float32))
        target = schedule.value(0)
        return jax.lax.cond(
            schedule.is_update(0),
            lambda: PruneState(masks_for(params, state, target), target),
            lambda: state,
        )

    def apply(params, state):
        return zero_pruned(params, state.masks)

    def update(params, state, step):
        target = schedule.value(step)
        return jax.lax.cond(
            schedule.is_update(step),
            lambda: PruneState(masks_for(params, state, target), jnp.asarray(target, jnp.float32)),
            lambda: state,
        )

    return core.Reparam(init, apply, update)


def _by_path(params: core.Params, paths) -> dict[str, jax.Array]:
    flat = {_path(k): v for k, v in _flat(params).items()}
    return {p: flat[p] for p in paths}


def fixed_masks(masks: dict[str, jax.Array]) -> core.Reparam:
    """Masks that never change (a lottery ticket's, `masks_from_zeros` of a pruned run)."""

    def init(params):
        flat = {_path(k) for k in _flat(params)}
        if missing := sorted(set(masks) - flat):
            raise ValueError(f"fixed masks name parameters the model lacks: {missing[:3]}")
        chosen = {p: jnp.asarray(m, bool) for p, m in masks.items()}
        sparsity = _sparsity(chosen)
        return PruneState(_with_masks(params, chosen), jnp.asarray(sparsity, jnp.float32))

    return core.Reparam(
        init, lambda params, state: zero_pruned(params, state.masks), lambda p, state, s: state
    )


def masks_from_zeros(params: core.Params, rules: core.Rules) -> dict[str, jax.Array]:
    """The masks a pruned model's zeros imply, for the weights `rules` select."""
    selected = _selected(params, rules, "prune")
    return {p: w != 0 for p, w in _by_path(params, selected).items()}


def rewind(pruned: core.Params, initial: core.Params, rules: core.Rules) -> core.Params:
    """Lottery-ticket rewinding (Frankle & Carbin; Chen et al. for BERT): the initial
    weights with the pruned model's mask, i.e. its zeros, applied."""
    masks = masks_from_zeros(pruned, rules)
    return zero_pruned(initial, _with_masks(initial, masks))


def _sparsity(masks: dict[str, jax.Array]) -> float:
    total = sum(m.size for m in masks.values())
    return float(sum(m.size - jnp.sum(m) for m in masks.values()) / max(total, 1))


def sparsity(params: core.Params, rules: core.Rules) -> float:
    """The fraction of exact zeros among the weights `rules` select."""
    return _sparsity(masks_from_zeros(params, rules))


def pruning_stats(params: core.Params, rules: core.Rules) -> dict[str, float | int]:
    """`sparsity` (the fraction of zeros among the weights `rules` select) and
    `remaining_params` (every stored value but those zeros: what a sparse artefact keeps)."""
    masks = masks_from_zeros(params, rules)
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    pruned = sum(int(m.size - jnp.sum(m)) for m in masks.values())
    return {"sparsity": _sparsity(masks), "remaining_params": int(total - pruned)}


def add_movement_scores(params: core.Params, rules: core.Rules, init: float = 0.0) -> core.Params:
    """`params` with a trainable movement score (constant `init`) beside each selected weight."""
    model, old = split_scores(params)
    if old:
        raise ValueError(f"params already hold movement scores (e.g. {min(old)})")
    selected = core.match_rules(model, rules, name="prune")
    flat = _flat(model)
    for key in list(flat):
        if _path(key) in selected:
            flat[key[:-1] + (f"{key[-1]}{SCORE_SUFFIX}",)] = jnp.full_like(flat[key], init)
    return unflatten_dict(flat)


def _straight_through(w: jax.Array, mask: jax.Array, score: jax.Array) -> jax.Array:
    """w * mask forward; gradients: dL/dw = g * mask, dL/dscore = g * w."""
    return w * (mask.astype(w.dtype) + score - jax.lax.stop_gradient(score))


def movement_pruning(
    rules: core.Rules, schedule: Schedule, mode: str = "hard", scope: str = "layer"
) -> core.Reparam:
    """Movement pruning of the weights `rules` select; train params from
    `add_movement_scores`. `schedule` is the sparsity ('hard') or the sigmoid(score)
    threshold ('soft'). `apply` returns the model's tree, scores dropped."""
    if mode not in MOVEMENT_MODES:
        raise ValueError(f"movement mode must be one of {MOVEMENT_MODES}, got {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")

    def masks_for(params, target):
        _, scores = split_scores(params)
        if not scores:
            raise ValueError("movement pruning needs scores: call add_movement_scores first")
        if mode == "hard":
            chosen = keep_top(scores, target, scope)
        else:
            chosen = {p: jax.nn.sigmoid(s) > target for p, s in scores.items()}
        return _with_masks(params, chosen)

    def init(params):
        _selected(params, rules, "prune")  # a rule that selects nothing fails here
        target = jnp.asarray(schedule.value(0), jnp.float32)
        return PruneState(masks_for(params, target), target)

    def apply(params, state):
        _, scores = split_scores(params)
        masks = _masks_by_path(state)
        flat = _flat(params)
        out = {}
        for key, w in flat.items():
            path = _path(key)
            if str(key[-1]).endswith(SCORE_SUFFIX):
                continue
            out[key] = _straight_through(w, masks[path], scores[path]) if path in scores else w
        return unflatten_dict(out)

    def update(params, state, step):
        target = jnp.asarray(schedule.value(step), jnp.float32)
        return jax.lax.cond(
            schedule.is_update(step),
            lambda: PruneState(masks_for(params, target), target),
            lambda: state,
        )

    return core.Reparam(init, apply, update)


def movement_penalty(params: core.Params) -> jax.Array:
    """Soft movement pruning's regulariser: the mean of sigmoid(score) over all scores."""
    _, scores = split_scores(params)
    if not scores:
        return jnp.zeros(())
    total = sum(jnp.sum(jax.nn.sigmoid(s)) for s in scores.values())
    return total / sum(s.size for s in scores.values())


class KeepPrunedZeroState(NamedTuple):
    inner: optax.OptState


def keep_pruned_zero(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner` whose update takes `masks=` (a `PruneState.masks` tree): pruned entries get
    zero gradient in, zero update out, and their optimizer moments are reset to zero, so a
    pruned weight does not move and nothing stale waits for it."""

    def init(params):
        return KeepPrunedZeroState(inner.init(params))

    def update(updates, state, params=None, *, masks, **extra):
        def zero(x, m):
            return jnp.where(m, x, jnp.zeros_like(x))

        updates = jax.tree.map(zero, updates, masks)
        updates, new_inner = inner.update(updates, state.inner, params)
        updates = jax.tree.map(zero, updates, masks)
        new_inner = optax.tree_utils.tree_map_params(
            inner, zero, new_inner, masks, transform_non_params=lambda x: x
        )
        return updates, KeepPrunedZeroState(new_inner)

    return optax.GradientTransformationExtraArgs(init, update)


METHODS = ("", "magnitude", "movement")


def rules_from_config(cfg: Any) -> list[tuple[str, Any]]:
    """The rules of a config's `prune` section: its `params` regex, nothing else."""
    return [(cfg.params, True), (".*", None)]


def from_config(
    cfg: Any, total_steps: int, masks: dict[str, jax.Array] | None = None
) -> core.Reparam | None:
    """The pruning a config's `prune` section asks for (None for none); `masks` are the
    fixed masks of `masks_from`, loaded by the caller."""
    if cfg.method not in METHODS:
        raise ValueError(f"prune.method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.masks_from:
        if cfg.method:
            raise ValueError("prune.masks_from fixes the masks; leave prune.method empty")
        return fixed_masks(masks)
    if not cfg.method:
        return None
    if not 0.0 <= cfg.begin <= cfg.end <= 1.0:
        raise ValueError(f"prune: need 0 <= begin <= end <= 1, got {cfg.begin}, {cfg.end}")
    final = cfg.threshold if (cfg.method, cfg.movement) == ("movement", "soft") else cfg.sparsity
    if not 0.0 <= final < 1.0 or not 0.0 <= cfg.initial_sparsity < 1.0:
        raise ValueError(f"prune: sparsity and threshold must be in [0, 1), got {final}")
    schedule = Schedule(
        final=final,
        initial=0.0
        if cfg.movement == "soft" and cfg.method == "movement"
        else cfg.initial_sparsity,
        begin_step=round(cfg.begin * total_steps),
        end_step=round(cfg.end * total_steps),
        frequency=cfg.frequency,
    )
    rules = rules_from_config(cfg)
    if cfg.method == "magnitude":
        return magnitude_pruning(rules, schedule, cfg.scope)
    return movement_pruning(rules, schedule, cfg.movement, cfg.scope)
