"""Q-BERT's Hessian-aware mixed precision (Shen et al. 2020): traces, bit widths, group rules.

Three pure steps:

1. `hutchinson_trace`: per parameter group (by default one group per encoder layer, its dense
   kernels), Hutchinson's estimate of the trace of the loss Hessian's diagonal block,
   tr(H_gg) = E[v_g^T (H v)_g] with Rademacher v. One Hessian-vector product per sample,
   forward-over-reverse (`jax.jvp` of `jax.grad`), serves every group at once: since
   E[v_i v_j] = [i == j], the part of v^T H v that falls on group g is unbiased for tr(H_gg).
   Q-BERT ranks groups by the average trace per parameter, tr(H_gg) / n_g.
2. `assign_bits`: a bit width per group, minimising the second-order loss proxy
   sum_g s_g * n_g * 2^(-2 b_g) (s_g the average trace, n_g the group's size; uniform
   quantization noise variance scales as 2^(-2 b)), subject to the parameter-weighted
   average bit width <= the budget. Solved exactly (see `assign_bits`).
3. `mixed_precision_rules`: `QuantSpec` group-wise rules (Q-BERT's group-wise quantization)
   for `qat.qat` and `quant_pack`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcompress import core
from jaxcompress.compress.quant.qat import KERNEL_LEAF
from jaxcompress.compress.quant.quantizers import QuantSpec
from jaxcompress.models.bert_rules import LAYER_PREFIX

GroupFn = Callable[[str], str | None]
_ENCODER_KERNEL = re.compile(rf"({re.escape(LAYER_PREFIX)}[^/]+)/.*/{KERNEL_LEAF}")
CHOICES = (2, 3, 4, 8)


class TraceEstimate(NamedTuple):
    """Hutchinson estimates per group name (float32 scalars)."""

    trace: dict[str, jax.Array]  # mean of the samples: tr(H_gg)
    stderr: dict[str, jax.Array]  # std of the samples (ddof=1) / sqrt(samples); nan for one
    per_param: dict[str, jax.Array]  # trace / number of parameters in the group (Q-BERT)


def encoder_layer_group(path: str) -> str | None:
    """The encoder layer ('bert/encoder/layer/<g>') of a dense kernel inside it, else None."""
    match = _ENCODER_KERNEL.fullmatch(path)
    return match.group(1) if match else None


def resolve_groups(params: core.Params, groups: GroupFn | core.Rules) -> dict[str, str]:
    """The group name of every grouped leaf path, from a function path -> name or None, or
    from rules `(regex, name or None)` (`core.match_rules`: first fullmatch wins)."""
    if callable(groups):
        named = {path: groups(path) for path in core.leaf_paths(params)}
        out = {path: name for path, name in named.items() if name is not None}
    else:
        out = core.match_rules(params, groups, name="hessian groups")
    bad = {path: name for path, name in out.items() if not isinstance(name, str)}
    if bad:
        raise ValueError(f"group names must be strings; got {bad}")
    if not out:
        raise ValueError("groups selected no parameter; every group would be empty")
    return out


def group_sizes(params: core.Params, groups: GroupFn | core.Rules) -> dict[str, int]:
    """Number of parameters in each group, in order of first appearance in the tree."""
    assignment = resolve_groups(params, groups)
    sizes: dict[str, int] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = assignment.get(core.path_str(key_path))
        if name is not None:
            sizes[name] = sizes.get(name, 0) + math.prod(jnp.shape(leaf))
    return sizes


def hvp(loss_fn: Callable[[core.Params], jax.Array], params: core.Params, v: core.Params):
    """The Hessian of `loss_fn` at `params` times `v`, forward-over-reverse."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def hutchinson_trace(
    loss_fn: Callable[[core.Params], jax.Array],
    params: core.Params,
    groups: GroupFn | core.Rules,
    key: jax.Array,
    samples: int,
) -> TraceEstimate:
    """Hutchinson's estimate of each group's Hessian trace from `samples` Rademacher probes.

    `loss_fn(params)` is a scalar (close over the batch). Probes are zero on ungrouped leaves.
    Samples run sequentially (`lax.map`), so memory is that of one Hessian-vector product;
    the whole function can be jitted with `loss_fn` and `groups` static.

    Args:
      loss_fn: `params -> scalar loss`, twice differentiable.
      params: the point at which the Hessian is taken; every leaf must be floating point.
      groups: a function `path -> group name or None`, or rules `(regex, name or None)`
        (first fullmatch wins, as `core.match_rules`); e.g. `encoder_layer_group`.
      key: the PRNG key of the probes.
      samples: the number of probes, an int >= 1.

    Returns:
      A `TraceEstimate`: per group name (in order of first appearance in the tree), the mean
      trace, its standard error (nan for one sample) and the trace per parameter.

    Raises:
      ValueError: `samples` is not an int >= 1, a leaf of `params` is not floating point, a
        group name is not a string, the groups select no parameter, or a rule selects none.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r}; expected an integer >= 1")
    assignment = resolve_groups(params, groups)
    names = list(dict.fromkeys(assignment.values()))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [core.path_str(p) for p, _ in leaves]
    slot = [names.index(assignment[p]) if p in assignment else -1 for p in paths]
    for path, (_, leaf) in zip(paths, leaves, strict=True):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"{path}: Hessian traces need float parameters, got {leaf.dtype}")
    values = [leaf for _, leaf in leaves]

    def probe(k: jax.Array) -> jax.Array:
        keys = jax.random.split(k, len(values))
        v = [
            jax.random.rademacher(kk, jnp.shape(x), jnp.result_type(x))
            if s >= 0
            else jnp.zeros_like(x)
            for kk, x, s in zip(keys, values, slot, strict=True)
        ]
        hv = treedef.flatten_up_to(hvp(loss_fn, params, treedef.unflatten(v)))
        per_group = [jnp.zeros((), jnp.float32) for _ in names]
        for s, vi, hi in zip(slot, v, hv, strict=True):
            if s >= 0:
                per_group[s] = per_group[s] + jnp.sum(vi * hi, dtype=jnp.float32)
        return jnp.stack(per_group)

    draws = jax.lax.map(probe, jax.random.split(key, samples))  # (samples, groups)
    mean = jnp.mean(draws, axis=0)
    if samples > 1:
        stderr = jnp.std(draws, axis=0, ddof=1) / math.sqrt(samples)
    else:
        stderr = jnp.full_like(mean, jnp.nan)
    sizes = group_sizes(params, assignment.get)
    return TraceEstimate(
        trace={n: mean[i] for i, n in enumerate(names)},
        stderr={n: stderr[i] for i, n in enumerate(names)},
        per_param={n: mean[i] / sizes[n] for i, n in enumerate(names)},
    )


def proxy_error(
    sensitivity: Mapping[str, float], sizes: Mapping[str, int], bits: Mapping[str, int]
) -> float:
    """The loss-increase proxy sum_g sensitivity_g * size_g * 2^(-2 bits_g)."""
    return sum(float(sensitivity[g]) * sizes[g] * 2.0 ** (-2 * bits[g]) for g in bits)


def average_bits(sizes: Mapping[str, int], bits: Mapping[str, int]) -> Fraction:
    """The parameter-weighted average bit width, exactly."""
    return Fraction(sum(sizes[g] * bits[g] for g in bits), sum(sizes[g] for g in bits))


def _check_assignment_inputs(
    sensitivity: Mapping[str, float], sizes: Mapping[str, int], choices: Sequence[int]
) -> None:
    if not sensitivity:
        raise ValueError("assign_bits needs at least one group")
    if set(sensitivity) != set(sizes):
        raise ValueError(
            f"sensitivity and sizes name different groups: {sorted(set(sensitivity))} vs "
            f"{sorted(set(sizes))}"
        )
    for g, s in sensitivity.items():
        if not math.isfinite(s) or s < 0:
            raise ValueError(
                f"sensitivity[{g!r}]={s}; expected finite and >= 0 (clip negative traces at 0)"
            )
    for g, n in sizes.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"sizes[{g!r}]={n!r}; expected a positive integer")
    if not choices:
        raise ValueError("choices is empty")
    for b in choices:
        if not isinstance(b, int) or not 2 <= b <= 8:
            raise ValueError(f"bit choice {b!r}; expected integers in 2..8 (QuantSpec's range)")


def _pareto(candidates: dict[int, tuple[float, tuple[int, ...]]]):
    """(cost, error, bits) states no other state beats in both cost and error, by cost."""
    front, best = [], math.inf
    for cost in sorted(candidates):
        error, bits = candidates[cost]
        if error < best:
            front.append((cost, error, bits))
            best = error
    return front


def assign_bits(
    sensitivity: Mapping[str, float],
    sizes: Mapping[str, int],
    choices: Sequence[int] = CHOICES,
    *,
    budget_bits: float,
) -> dict[str, int]:
    """The bit width per group minimising `proxy_error` with average bits <= `budget_bits`.

    `sensitivity` is the average Hessian trace per parameter (`TraceEstimate.per_param`,
    converted to floats), so a group's weight in the objective is its total trace: more
    sensitive groups get more bits. This is a multiple-choice knapsack, solved exactly by
    dynamic programming over the groups (in the given order) that keeps, per prefix, only
    the Pareto-optimal (total bits, error) partial assignments that can still meet the budget;
    with equal group sizes there are at most (max - min choice) * groups + 1 of them. Ties
    go to fewer total bits. The budget is compared exactly (rational arithmetic).

    Args:
      sensitivity: per group name, its sensitivity (finite, >= 0), e.g. the average trace
        per parameter.
      sizes: per group name (the same names), its number of parameters (a positive int).
      choices: the bit widths a group may get, ints in 2..8.
      budget_bits: the largest allowed parameter-weighted average bit width.

    Returns:
      `{group: bits}` for every group, in the order of `sensitivity`.

    Raises:
      ValueError: there is no group, `sensitivity` and `sizes` name different groups, a
        sensitivity, size or choice is out of range, `choices` is empty, or `budget_bits` is
        below the smallest choice.
    """
    _check_assignment_inputs(sensitivity, sizes, choices)
    options = sorted(set(choices))
    if budget_bits < options[0]:
        raise ValueError(
            f"budget_bits={budget_bits} is below the smallest choice {options[0]}; "
            "no assignment fits"
        )
    names = list(sensitivity)
    budget = Fraction(budget_bits) * sum(sizes[g] for g in names)
    # The least bits the groups after position i can take.
    rest = [sum(sizes[g] for g in names[i:]) * options[0] for i in range(len(names) + 1)]
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i, g in enumerate(names):
        candidates: dict[int, tuple[float, tuple[int, ...]]] = {}
        for cost, error, bits in front:
            for b in options:
                total = cost + sizes[g] * b
                if total + rest[i + 1] > budget:
                    break  # options ascend: larger widths cost more
                e = error + float(sensitivity[g]) * sizes[g] * 2.0 ** (-2 * b)
                if total not in candidates or e < candidates[total][0]:
                    candidates[total] = (e, (*bits, b))
        front = _pareto(candidates)
    _, _, bits = min(front, key=lambda state: (state[1], state[0]))
    return dict(zip(names, bits, strict=True))


def group_pattern(group: str) -> str:
    """The regex of the dense kernels under a group named by its path prefix."""
    return rf"{re.escape(group)}/(.*/)?{KERNEL_LEAF}"


def mixed_precision_rules(
    bits: Mapping[str, int],
    group_size: int,
    patterns: Mapping[str, str] | None = None,
    scheme: str = "symmetric",
    scale_method: str | None = None,
    tail: core.Rules = ((".*", None),),
) -> list[tuple[str, QuantSpec | None]]:
    """`qat` / `quant_pack` rules quantizing each group at its width, group-wise.

    Each group's parameters get `QuantSpec(bits, scheme, 'group', group_size, scale_method)`:
    one scale per column and per block of `group_size` rows (Q-BERT's group-wise
    quantization). `patterns` maps a group to its regex; by default a group is a path prefix
    (as `encoder_layer_group` names them) and its dense kernels are selected. `tail` follows
    the group rules, e.g. `bert_rules.weight_rules(...)` to quantize embeddings and other
    kernels too.
    """
    if not bits:
        raise ValueError("mixed_precision_rules needs at least one group")
    if patterns is not None:
        missing = sorted(set(bits) - set(patterns))
        if missing:
            raise ValueError(f"no pattern for group(s) {missing}")
    rules: list[tuple[str, QuantSpec | None]] = []
    for g, b in bits.items():
        try:
            spec = QuantSpec(b, scheme, "group", group_size, scale_method)
        except ValueError as e:
            raise ValueError(f"group {g!r}: {e}") from None
        rules.append((patterns[g] if patterns is not None else group_pattern(g), spec))
    return rules + list(tail)
