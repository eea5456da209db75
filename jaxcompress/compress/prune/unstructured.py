"""Unstructured pruning as `core.Reparam`s: magnitude (one-shot, gradual) and movement pruning.

State is a `PruneState`: a boolean mask for every leaf of the trainable tree (a scalar
`True` for leaves no rule selects) and the sparsity (or, for soft movement pruning, the
score threshold) in force. `apply` zeroes pruned weights in the forward pass; `update`
recomputes masks at the schedule's steps (it runs inside the jitted train step). Under
`core.with_reparam(reparam, optimizer)` the state lives in the optimizer state and magnitude
pruning's zeros are kept in the stored weights, with zero updates and moments. Any pytree
works (dicts, FrozenDict, lists, tuples, int keys, nnx.State) and keeps its structure.

A rule's value is True (the schedule's sparsity), a float in [0, 1) (that rule's own final
sparsity, reached along the same schedule) or False/None (leave alone).

Schedules follow Zhu & Gupta (2017): the target goes from `initial` to `final` between
`begin_step` and `end_step` along 1 - (1 - t)^power (power 3), recomputed every `frequency`
steps; begin == end is one-shot pruning. Masks keep exactly round((1 - s) * n) weights (ties
by position), per selected leaf (`scope='layer'`) or over all of them (`scope='global'`).

Movement pruning (Sanh et al., 2020) learns a score per weight: scores live in the params
tree beside their weight (key + `SCORE_SUFFIX`) and are trained by the straight-through
estimator, dL/dS = dL/dW' * W, i.e. the accumulated movement -W * dL/dW with the sign of a
gradient. 'hard' keeps the top-scored weights at the scheduled sparsity; 'soft' keeps
weights with sigmoid(S) above a scheduled threshold, with an L1 penalty on sigmoid(S)
(`movement_penalty`) that sets how much is pruned. Scores can start from the movement of
the fine-tune that produced the start model (`add_movement_scores(fine_tuned_from=...)`):
from a fine-tuned model, a short run's own minibatch gradients rank weights no better
than chance when pruning starts (benchmarks/results/movement_scores.json).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.compress import tree

SCORE_SUFFIX = "@movement_score"
SCOPES = ("layer", "global")
MOVEMENT_MODES = ("hard", "soft")


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Zhu & Gupta's gradual schedule of a target (sparsity, or soft-movement threshold).

    The target goes from `initial` to `final` between `begin_step` and `end_step` along
    1 - (1 - t)^power, changing only at the update steps (every `frequency` steps from
    `begin_step`, and `end_step`).

    Attributes:
      final: the target from `end_step` on, in [0, 1).
      initial: the target before `begin_step`, in [0, 1).
      begin_step: the first update step (an int >= 0).
      end_step: the last update step (an int >= `begin_step`); equal to `begin_step`:
        one-shot at `begin_step`.
      frequency: steps between mask updates inside [begin_step, end_step] (an int >= 1).
      power: the exponent of the curve, > 0.

    Raises:
      ValueError: a field is outside the ranges above, or a step field is not an int.
    """

    final: float  # the target from end_step on, in [0, 1)
    initial: float = 0.0  # the target before begin_step, in [0, 1)
    begin_step: int = 0
    end_step: int = 0  # == begin_step: one-shot at begin_step
    frequency: int = 1  # steps between mask updates inside [begin_step, end_step]
    power: float = 3.0  # > 0

    def __post_init__(self) -> None:
        for field in ("final", "initial"):
            value = getattr(self, field)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"Schedule.{field} must be a sparsity (or threshold) in [0, 1), got {value!r}"
                )
        for field in ("begin_step", "end_step", "frequency"):
            if not _is_int(getattr(self, field)):
                raise ValueError(
                    f"Schedule.{field} must be an int, got {getattr(self, field)!r}; round it"
                )
        if not 0 <= self.begin_step <= self.end_step:
            raise ValueError(f"Schedule: need 0 <= begin_step <= end_step, got {self}")
        if self.frequency < 1:
            raise ValueError(f"Schedule.frequency must be >= 1, got {self.frequency}")
        if not _is_real(self.power) or not self.power > 0:
            raise ValueError(f"Schedule.power must be a number > 0, got {self.power!r}")

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

    def scaled_to(self, final: float) -> Schedule:
        """The same schedule ending at `final` (a rule's own sparsity)."""
        return dataclasses.replace(self, final=final, initial=min(self.initial, final))


class PruneState(NamedTuple):
    masks: Any  # bool, shaped like the trainable tree; scalar True where nothing is pruned
    target: jax.Array  # the schedule's sparsity (or soft threshold) of the current masks


def prune_rules(rules: core.Rules) -> list[tuple[str, bool | float | None]]:
    """Pruning rules checked and normalised: a rule's value is True (the schedule's
    sparsity), a float in [0, 1) (that rule's own final sparsity, reached along the same
    schedule) or False/None (leave alone; returned as None).

    Raises:
      ValueError: any other value.
    """
    out: list[tuple[str, bool | float | None]] = []
    for pattern, value in rules:
        if value is None or (isinstance(value, bool | np.bool_) and not value):
            out.append((pattern, None))
        elif isinstance(value, bool | np.bool_):
            out.append((pattern, True))
        elif _is_real(value) and 0.0 <= value < 1.0:
            out.append((pattern, float(value)))
        else:
            raise ValueError(
                f"prune rule {pattern!r}: value must be True (the schedule's sparsity), a "
                f"sparsity in [0, 1) or False/None (leave alone), got {value!r}"
            )
    return out


def _schedule_of(spec: bool | float, schedule: Schedule) -> Schedule:
    return schedule if spec is True else schedule.scaled_to(spec)


def split_scores(params: core.Params) -> tuple[core.Params, dict[str, jax.Array]]:
    """The params without movement scores (same structure otherwise), and the scores by
    their weight's path."""
    return tree.strip_suffix(params, SCORE_SUFFIX)


def _selected(params: core.Params, rules: core.Rules, name: str = "prune") -> dict[str, Any]:
    model, _ = split_scores(params)
    return core.match_rules(model, prune_rules(rules), name=name)


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


def _keep_top_by_rule(
    values: dict[str, jax.Array],
    selected: dict[str, Any],
    schedule: Schedule,
    step: jax.Array,
    scope: str,
) -> dict[str, jax.Array]:
    """`keep_top` at each rule's own target; 'global' ranks the weights of one target
    together."""
    groups: dict[Any, dict[str, jax.Array]] = {}
    for path, v in values.items():
        groups.setdefault(selected[path], {})[path] = v
    out: dict[str, jax.Array] = {}
    for spec, group in groups.items():
        out.update(keep_top(group, _schedule_of(spec, schedule).value(step), scope))
    return out


def _with_masks(params: core.Params, masks: dict[str, jax.Array]) -> core.Params:
    """A mask tree shaped like `params`: the given masks, scalar True elsewhere."""
    return core.like(params, masks, lambda _: jnp.array(True))


def _masks_by_path(state: PruneState) -> dict[str, jax.Array]:
    return core.leaves_by_path(state.masks)


def zero_pruned(params: core.Params, masks: core.Params) -> core.Params:
    """`params` with every pruned weight set to exactly zero."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def _stored_masks(params: core.Params, state: PruneState) -> core.Params:
    return state.masks


def magnitude_pruning(rules: core.Rules, schedule: Schedule, scope: str = "layer") -> core.Reparam:
    """Gradual (or one-shot) magnitude pruning of the weights `rules` select.

    Pruned weights stay pruned: later masks rank only the weights still kept. Under
    `core.with_reparam` they are also zero in the stored params, with zero optimizer moments.

    Args:
      rules: `(regex, value)` pairs; value True prunes to `schedule`'s sparsity, a float in
        [0, 1) to that sparsity (along the same schedule), False/None leaves alone.
      schedule: when and how far to prune.
      scope: 'layer' (each weight to its target) or 'global' (the weights of one target
        ranked together).

    Returns:
      A `core.Reparam` whose state is a `PruneState`.

    Raises:
      ValueError: a rule's value is not True, a float in [0, 1), False or None; or `scope`
        is neither 'layer' nor 'global'.
    """
    rules = prune_rules(rules)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")

    def masks_for(params, state, step):
        selected = _selected(params, rules)
        old = _masks_by_path(state)
        flat = core.leaves_by_path(params)
        magnitude = {p: jnp.where(old[p], jnp.abs(flat[p]), -1.0) for p in selected}
        return _with_masks(params, _keep_top_by_rule(magnitude, selected, schedule, step, scope))

    def init(params):
        selected = _selected(params, rules)
        flat = core.leaves_by_path(params)
        ones = {p: jnp.ones(jnp.shape(flat[p]), bool) for p in selected}
        state = PruneState(_with_masks(params, ones), jnp.zeros((), jnp.float32))
        target = jnp.asarray(schedule.value(0), jnp.float32)
        return jax.lax.cond(
            schedule.is_update(0),
            lambda: PruneState(masks_for(params, state, 0), target),
            lambda: state,
        )

    def apply(params, state):
        return zero_pruned(params, state.masks)

    def update(params, state, step):
        target = jnp.asarray(schedule.value(step), jnp.float32)
        return jax.lax.cond(
            schedule.is_update(step),
            lambda: PruneState(masks_for(params, state, step), target),
            lambda: state,
        )

    return core.Reparam(init, apply, update, stored_mask=_stored_masks)


def fixed_masks(masks: dict[str, jax.Array]) -> core.Reparam:
    """Masks that never change (a lottery ticket's, `masks_from_zeros` of a pruned run)."""

    def init(params):
        if missing := sorted(set(masks) - set(core.leaf_paths(params))):
            raise ValueError(f"fixed masks name parameters the model lacks: {missing[:3]}")
        chosen = {p: jnp.asarray(m, bool) for p, m in masks.items()}
        sparsity = _sparsity(chosen)
        return PruneState(_with_masks(params, chosen), jnp.asarray(sparsity, jnp.float32))

    return core.Reparam(
        init,
        lambda params, state: zero_pruned(params, state.masks),
        lambda p, state, s: state,
        stored_mask=_stored_masks,
    )


def masks_from_zeros(params: core.Params, rules: core.Rules) -> dict[str, jax.Array]:
    """The masks a pruned model's zeros imply, for the weights `rules` select."""
    selected = _selected(params, rules)
    flat = core.leaves_by_path(params)
    return {p: flat[p] != 0 for p in selected}


def rewind(pruned: core.Params, initial: core.Params, rules: core.Rules) -> core.Params:
    """Lottery-ticket rewinding (Frankle & Carbin; Chen et al. for BERT): the initial
    weights with the pruned model's mask, i.e. its zeros, applied.

    Args:
      pruned: the pruned model's params; its exact zeros among the selected weights are the
        mask.
      initial: the params to rewind to, with the same paths.
      rules: pruning rules selecting the weights whose zeros carry over (values as for
        `magnitude_pruning`; only whether a rule selects matters).

    Returns:
      `initial` with a zero wherever a selected weight of `pruned` is zero.
    """
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


def add_movement_scores(
    params: core.Params,
    rules: core.Rules,
    init: float = 0.0,
    fine_tuned_from: core.Params | None = None,
    magnitude: float = 0.0,
) -> core.Params:
    """`params` with a trainable movement score beside each selected weight.

    In a mapping the score is the entry `<name>@movement_score` (an `nnx.Variable` of the
    weight's type in an `nnx.State`); the rest of the tree keeps its structure.

    Args:
      params: the parameter tree, without movement scores.
      rules: pruning rules as for `movement_pruning`; a score is added beside each weight a
        rule selects with a value other than False/None.
      init: the initial value of every score.
      fine_tuned_from: the params `params` were fine-tuned from (same paths and shapes for
        the selected weights), or None. Each score then starts at `init + |W| - |W_from|`,
        the movement away from zero of that fine-tune: scores trained by Adam at the
        weights' rate grow as |W| does (both steps are normalised per entry), so this is
        the score a movement run over that fine-tune would have accumulated, without its
        minibatch noise, and the pruning run continues it.
      magnitude: scores also start at this multiple of |W_from| (of |W| without
        `fine_tuned_from`): a magnitude prior, so that weights that were large before the
        fine-tune and stayed so are not ranked below ones that moved a little.

    Returns:
      The tree with the scores added, ready for `movement_pruning`.

    Raises:
      ValueError: the params already hold scores, a selected weight sits in a list or tuple
        (a score needs a key beside it), or `fine_tuned_from` lacks a selected weight or
        holds it in another shape.
    """
    model, old = split_scores(params)
    if old:
        raise ValueError(f"params already hold movement scores (e.g. {min(old)})")
    flat = core.leaves_by_path(model)
    before = None
    if fine_tuned_from is not None:
        before = core.leaves_by_path(split_scores(fine_tuned_from)[0])
    scores = {}
    for path in _selected(model, rules):
        weight = jnp.abs(flat[path])
        start = weight  # without a fine-tune: no movement, the prior on |W| itself
        if before is not None:
            if path not in before or jnp.shape(before[path]) != jnp.shape(flat[path]):
                found = jnp.shape(before[path]) if path in before else "nothing"
                raise ValueError(
                    f"movement scores from a fine-tune: its start model has {found} at "
                    f"{path!r}, the model {jnp.shape(flat[path])}; give the model it was "
                    "fine-tuned from, before any structure transform"
                )
            start = jnp.abs(jnp.asarray(before[path], flat[path].dtype))
        scores[path] = init + magnitude * start + (weight - start)
    return tree.add_beside(model, scores, SCORE_SUFFIX)


def _straight_through(w: jax.Array, mask: jax.Array, score: jax.Array) -> jax.Array:
    """w * mask forward; gradients: dL/dw = g * mask, dL/dscore = g * w."""
    return w * (mask.astype(w.dtype) + score - jax.lax.stop_gradient(score))


def movement_pruning(
    rules: core.Rules, schedule: Schedule, mode: str = "hard", scope: str = "layer"
) -> core.Reparam:
    """Movement pruning of the weights `rules` select; train params from
    `add_movement_scores`.

    Args:
      rules: as for `magnitude_pruning`; a float value is that rule's own final sparsity
        ('hard') or sigmoid(score) threshold ('soft').
      schedule: the sparsity ('hard') or the sigmoid(score) threshold ('soft').
      mode: 'hard' (top scores kept) or 'soft' (scores above the threshold kept).
      scope: 'layer' or 'global', as for `magnitude_pruning` ('hard' only).

    Returns:
      A `core.Reparam`: `apply` returns the model's tree (scores dropped) with pruned weights
      masked by the straight-through estimator; `finalize` the model's tree with pruned
      weights zero. Stored weights are not projected: under `core.with_reparam` a pruned
      weight keeps its value without moving, and comes back as it was if its score rises.

    Raises:
      ValueError: a rule's value is not True, a float in [0, 1), False or None, or `mode` or
        `scope` is not one of the above.
    """
    rules = prune_rules(rules)
    if mode not in MOVEMENT_MODES:
        raise ValueError(f"movement mode must be one of {MOVEMENT_MODES}, got {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")

    def masks_for(params, step):
        selected = _selected(params, rules)
        _, scores = split_scores(params)
        if not scores:
            raise ValueError("movement pruning needs scores: call add_movement_scores first")
        scores = {p: s for p, s in scores.items() if p in selected}
        if mode == "hard":
            chosen = _keep_top_by_rule(scores, selected, schedule, step, scope)
        else:
            chosen = {
                p: jax.nn.sigmoid(s) > _schedule_of(selected[p], schedule).value(step)
                for p, s in scores.items()
            }
        return _with_masks(params, chosen)

    def init(params):
        target = jnp.asarray(schedule.value(0), jnp.float32)
        return PruneState(masks_for(params, 0), target)

    def apply(params, state):
        model, scores = split_scores(params)
        masks = _masks_by_path(state)

        def visit(path, w):
            return _straight_through(w, masks[path], scores[path]) if path in scores else w

        return core.map_with_path(visit, model)

    def finalize(params, state):
        model, _ = split_scores(params)
        masks = _masks_by_path(state)
        return core.map_with_path(
            lambda path, w: jnp.where(masks[path], w, jnp.zeros_like(w)), model
        )

    def update(params, state, step):
        target = jnp.asarray(schedule.value(step), jnp.float32)
        return jax.lax.cond(
            schedule.is_update(step),
            lambda: PruneState(masks_for(params, step), target),
            lambda: state,
        )

    return core.Reparam(init, apply, update, finalize, frozen_mask=_stored_masks)


def movement_penalty(params: core.Params) -> jax.Array:
    """Soft movement pruning's regulariser: the mean of sigmoid(score) over all scores."""
    _, scores = split_scores(params)
    if not scores:
        return jnp.zeros(())
    total = sum(jnp.sum(jax.nn.sigmoid(s)) for s in scores.values())
    return total / sum(s.size for s in scores.values())
