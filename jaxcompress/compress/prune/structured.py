"""Structured pruning: score heads and FFN neurons (Michel et al. 2019), mask, physically remove."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.compress.distill.objective import Batch, forward, task_loss
from jaxcompress.core import StructureTransform
from jaxcompress.models import bert_rules
from jaxcompress.models.bert import Bert, BertConfig

# Importance arrays are [layers, max units] float, NaN where a layer has fewer units (already
# pruned); keep masks are bool of the same shape, True = keep. A unit is a head or an FFN neuron.
# (config, params) -> gradient trees of the loss w.r.t. params, one per batch.
GradientFn = Callable[[BertConfig, dict], Iterable[dict]]
KINDS = ("heads", "ffn")
SCOPES = ("global", "layer")

_LAYER = bert_rules.LAYER_PREFIX
# Per kind: the modules whose output columns are a unit's, and the one whose input rows are.
_PRODUCERS = {
    "heads": ("attention/self/query", "attention/self/key", "attention/self/value"),
    "ffn": ("intermediate/dense",),
}
_CONSUMER = {"heads": "attention/output/dense", "ffn": "output/dense"}
_GROUPS = {"heads": "attention_groups", "ffn": "ffn_groups"}
_SIZES = {"heads": "heads_per_layer", "ffn": "intermediate_per_layer"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_supported(config: BertConfig, kind: str) -> None:
    """Structured pruning needs one dense copy of each layer's parameters."""
    groups = getattr(config, _GROUPS[kind])
    if groups is not None:
        raise ValueError(
            f"structured pruning of {kind} needs unshared layers; config.{_GROUPS[kind]} = "
            f"{groups} (apply models.bert.unshare_layers first)"
        )
    for layer in range(config.num_hidden_layers):
        for module in (*_PRODUCERS[kind], _CONSUMER[kind]):
            path = f"{_LAYER}{layer}/{module}"
            if (rank := config.rank_of(path)) is not None:
                raise ValueError(
                    f"{path} is low-rank (rank {rank}, kernel_a/kernel_b); structured pruning "
                    f"of {kind} needs its dense kernel"
                )


def _sizes(config: BertConfig, kind: str) -> list[int]:
    size_of = config.layer_heads if kind == "heads" else config.layer_intermediate
    return [size_of(layer) for layer in range(config.num_hidden_layers)]


def _valid(config: BertConfig, kind: str) -> np.ndarray:
    """[layers, max units] bool: which entries are existing units."""
    sizes = _sizes(config, kind)
    return np.arange(max(sizes, default=0))[None, :] < np.array(sizes, int)[:, None]


def _unit_width(config: BertConfig, kind: str) -> int:
    return config.attention_head_size if kind == "heads" else 1


def _check_fraction(fraction: float) -> None:
    if not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _check_count(name: str, value: int, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def gate_gradients(config: BertConfig, params: dict, grads: dict, kind: str) -> np.ndarray:
    """Signed dL/dxi for a gate xi on every head (`kind='heads'`) or FFN neuron (`'ffn'`).

    A gate on head h scales rows h*d:(h+1)*d of the attention-output kernel W (a neuron: its
    row of the FFN output kernel), so dL/dxi = sum(W * dL/dW) over those rows: no model change.
    [layers, max units] float64, NaN where a layer has fewer units.
    """
    _check_kind(kind)
    _check_supported(config, kind)
    flat_p, flat_g = flatten_dict(params, sep="/"), flatten_dict(grads, sep="/")
    sizes, width = _sizes(config, kind), _unit_width(config, kind)
    out = np.full((len(sizes), max(sizes, default=0)), np.nan)
    for layer, n in enumerate(sizes):
        path = f"{_LAYER}{layer}/{_CONSUMER[kind]}/kernel"
        w = np.asarray(flat_p[path], np.float64)
        g = np.asarray(flat_g[path], np.float64)
        out[layer, :n] = (w * g).reshape(n, width * w.shape[1]).sum(1)
    return out


def normalize_importance(importance: np.ndarray) -> np.ndarray:
    """Each layer divided by its L2 norm over existing units (Michel et al.); zero rows kept."""
    norm = np.sqrt(np.nansum(np.square(importance), axis=1, keepdims=True))
    return importance / np.where(norm > 0, norm, 1.0)


def accumulate_importance(
    config: BertConfig,
    params: dict,
    grad_batches: Iterable[dict],
    kind: str = "heads",
    normalize: bool = True,
) -> np.ndarray:
    """Sum over batches of |dL/dxi| per head or neuron, optionally normalised per layer."""
    total = None
    for grads in grad_batches:
        score = np.abs(gate_gradients(config, params, grads, kind))
        total = score if total is None else total + score
    if total is None:
        raise ValueError("accumulate_importance got no gradient batches")
    if not np.all(np.isfinite(total[_valid(config, kind)])):
        raise ValueError(f"{kind} importance is not finite: the gradients contain inf or NaN")
    return normalize_importance(total) if normalize else total


def head_importance(
    config: BertConfig, params: dict, grads: dict, normalize: bool = True
) -> np.ndarray:
    """Michel et al.'s importance |dL/dxi_h| of every attention head, from one gradient tree.

    Args:
      config: the model's `BertConfig` (pruned and shared layers included).
      params: the model's parameters.
      grads: the gradient of the task loss w.r.t. `params` (same tree), e.g. one batch's.
      normalize: divide each layer by its L2 norm over existing heads.

    Returns:
      A float array [layers, max heads per layer], NaN where a layer has fewer heads.
    """
    return accumulate_importance(config, params, [grads], "heads", normalize)


def ffn_importance(
    config: BertConfig, params: dict, grads: dict, normalize: bool = True
) -> np.ndarray:
    """|dL/dxi_j| of every FFN neuron from one gradient tree: [layers, max intermediate]."""
    return accumulate_importance(config, params, [grads], "ffn", normalize)


def _round(x) -> np.ndarray:
    """Python's round(): halves go to the even neighbour (round(4.5) == 4)."""
    return np.rint(np.asarray(x, np.float64)).astype(int)


def _removal_counts(valid: np.ndarray, fraction: float, scope: str) -> np.ndarray:
    """How many units to remove: a scalar (global) or one per layer."""
    return _round(fraction * (valid.sum() if scope == "global" else valid.sum(1)))


def _keep_mask(
    importance: np.ndarray, remove: np.ndarray, scope: str, min_per_layer: int
) -> np.ndarray:
    """Remove the `remove` lowest-importance units (ties: lowest index first)."""
    valid = ~np.isnan(importance)
    keep = valid.copy()
    left = valid.sum(1)
    if scope == "layer":
        for layer, n in enumerate(remove):
            if n > left[layer] - min_per_layer:
                raise ValueError(
                    f"layer {layer}: removing {n} of {left[layer]} units leaves fewer than "
                    f"min_per_layer={min_per_layer}"
                )
            units = np.flatnonzero(valid[layer])
            order = units[np.argsort(importance[layer, units], kind="stable")]
            keep[layer, order[:n]] = False
        return keep
    units = np.flatnonzero(valid.ravel())
    order = units[np.argsort(importance.ravel()[units], kind="stable")]
    removed = 0
    for unit in order:
        if removed == remove:
            break
        layer, index = divmod(int(unit), importance.shape[1])
        if left[layer] > min_per_layer:
            keep[layer, index] = False
            left[layer] -= 1
            removed += 1
    if removed < remove:
        raise ValueError(
            f"cannot remove {int(remove)} of {int(valid.sum())} units with "
            f"min_per_layer={min_per_layer}"
        )
    return keep


def structured_mask(
    importance: np.ndarray, fraction: float, scope: str = "global", min_per_layer: int = 0
) -> np.ndarray:
    """Keep mask removing the lowest-importance units; NaN entries do not exist (False).

    `scope='global'` removes round(fraction * all units) across layers (never taking a layer
    below `min_per_layer`); `'layer'` removes round(fraction * units) in every layer (Python
    round: half to even). A layer may lose every unit: it then adds only the output bias.
    """
    _check_fraction(fraction)
    _check_scope(scope)
    importance = np.asarray(importance, np.float64)
    if importance.ndim != 2:
        raise ValueError(f"importance must be [layers, units], got shape {importance.shape}")
    _check_count("min_per_layer", min_per_layer, 0)
    remove = _removal_counts(~np.isnan(importance), fraction, scope)
    return _keep_mask(importance, remove, scope, min_per_layer)


def head_mask(
    importance: np.ndarray, fraction: float, scope: str = "global", min_per_layer: int = 0
) -> np.ndarray:
    """Heads to keep, [layers, max heads] bool; see `structured_mask`."""
    return structured_mask(importance, fraction, scope, min_per_layer)


def neuron_mask(
    importance: np.ndarray, fraction: float, scope: str = "global", min_per_layer: int = 0
) -> np.ndarray:
    """FFN neurons to keep, [layers, max intermediate] bool; see `structured_mask`."""
    return structured_mask(importance, fraction, scope, min_per_layer)


def _layer_keeps(config: BertConfig, keep: np.ndarray, kind: str) -> list[np.ndarray]:
    """Per layer, a bool per existing unit; entries past a layer's size are ignored."""
    _check_supported(config, kind)
    sizes = _sizes(config, kind)
    keep = np.asarray(keep)
    expected = (len(sizes), max(sizes, default=0))
    if keep.shape != expected or keep.dtype != bool:
        raise ValueError(f"{kind} keep mask must be bool {expected}, got {keep.dtype} {keep.shape}")
    return [keep[layer, :n] for layer, n in enumerate(sizes)]


def _units(config: BertConfig, kind: str, keep: np.ndarray | None):
    """(layer, kept parameter columns as a bool mask) for each layer, or nothing."""
    if keep is None:
        return []
    width = _unit_width(config, kind)
    return [
        (layer, np.repeat(k, width)) for layer, k in enumerate(_layer_keeps(config, keep, kind))
    ]


def apply_structured_mask(
    config: BertConfig,
    params: dict,
    head_keep: np.ndarray | None = None,
    ffn_keep: np.ndarray | None = None,
) -> dict:
    """Params with pruned heads / neurons zeroed (same shapes); `None` keeps all of a kind.

    Zeroes the unit's producer columns and biases (q/k/v, intermediate) and its consumer rows
    (attention-output, FFN-output kernel); the latter alone removes its contribution exactly.
    Jit-able: the masks are host constants.
    """
    flat = flatten_dict(params, sep="/")
    for kind, keep in (("heads", head_keep), ("ffn", ffn_keep)):
        for layer, cols in _units(config, kind, keep):
            prefix = f"{_LAYER}{layer}/"
            for module in _PRODUCERS[kind]:
                for name, m in (("kernel", cols[None, :]), ("bias", cols)):
                    x = flat[f"{prefix}{module}/{name}"]
                    flat[f"{prefix}{module}/{name}"] = jnp.where(m, x, jnp.zeros((), x.dtype))
            x = flat[f"{prefix}{_CONSUMER[kind]}/kernel"]
            flat[f"{prefix}{_CONSUMER[kind]}/kernel"] = jnp.where(
                cols[:, None], x, jnp.zeros((), x.dtype)
            )
    return unflatten_dict(flat, sep="/")


def _take(x: jax.Array, index: np.ndarray, axis: int) -> jax.Array:
    """Slice on the host: one-off, and no per-shape compilation of a gather."""
    return jnp.asarray(np.take(np.asarray(x), index, axis=axis))


def shrink(
    config: BertConfig,
    params: dict,
    head_keep: np.ndarray | None = None,
    ffn_keep: np.ndarray | None = None,
) -> tuple[BertConfig, dict]:
    """Physically remove pruned heads and FFN neurons; computes what the masked parent does.

    Kept units stay in their order, so masks index the input model. A layer that keeps every
    unit keeps its arrays, so removing nothing returns the input leaves.

    Args:
      config: the model's `BertConfig`.
      params: the model's parameters.
      head_keep: bool [layers, max heads], True = keep; None keeps every head.
      ffn_keep: bool [layers, max intermediate], True = keep; None keeps every FFN neuron.

    Returns:
      `(config, params)` of the smaller model: `heads_per_layer` / `intermediate_per_layer`
      set (back to `None` when every layer has the uniform size), the pruned rows and
      columns sliced out of the kernels and biases.
    """
    flat = flatten_dict(params, sep="/")
    changes = {}
    for kind, keep in (("heads", head_keep), ("ffn", ffn_keep)):
        units = _units(config, kind, keep)
        for layer, cols in units:
            if cols.all():
                continue  # nothing removed: the same arrays (placement kept, no host copy)
            prefix, index = f"{_LAYER}{layer}/", np.flatnonzero(cols)
            for module in _PRODUCERS[kind]:
                for name, axis in (("kernel", 1), ("bias", 0)):
                    path = f"{prefix}{module}/{name}"
                    flat[path] = _take(flat[path], index, axis)
            consumer = f"{prefix}{_CONSUMER[kind]}/kernel"
            flat[consumer] = _take(flat[consumer], index, 0)
        if units:
            counts = tuple(int(k.sum()) for k in _layer_keeps(config, keep, kind))
            uniform = config.num_attention_heads if kind == "heads" else config.intermediate_size
            changes[_SIZES[kind]] = None if set(counts) == {uniform} else counts
    return config.replace(**changes), unflatten_dict(flat, sep="/")


def iterative_prune(
    config: BertConfig,
    params: dict,
    gradient_fn: GradientFn,
    fraction: float,
    kind: str = "heads",
    steps: int = 1,
    scope: str = "global",
    min_per_layer: int = 0,
    normalize: bool = True,
) -> np.ndarray:
    """Michel et al.'s iterative pruning; returns the final keep mask.

    In `steps` equal increments up to round(fraction * units): each step scores the units of
    the model masked so far with `gradient_fn(config, masked_params)` and removes the lowest.
    """
    _check_kind(kind)
    _check_fraction(fraction)
    _check_scope(scope)
    _check_supported(config, kind)
    _check_count("steps", steps, 1)
    _check_count("min_per_layer", min_per_layer, 0)
    valid = _valid(config, kind)
    final = _removal_counts(valid, fraction, scope)
    keep = valid.copy()
    arg = "head_keep" if kind == "heads" else "ffn_keep"
    for step in range(1, steps + 1):
        target = _round(final * step / steps)
        removed = (valid & ~keep).sum(None if scope == "global" else 1)
        if np.array_equal(target, removed):
            continue  # nothing new to remove at this step
        masked = apply_structured_mask(config, params, **{arg: keep})
        importance = accumulate_importance(
            config, masked, gradient_fn(config, masked), kind, normalize
        )
        importance = np.where(valid & ~keep, -np.inf, importance)  # removed stay removed
        keep = _keep_mask(importance, target, scope, min_per_layer)
    return keep


def task_gradient_fn(batches: Sequence[Batch]) -> GradientFn:
    """A `GradientFn` from fixed batches: jax.grad of the task loss, dropout off.

    Batches are `data/glue.py` batches: input_ids, attention_mask, token_type_ids, labels and
    example_mask. One jit-compiled gradient per config, reused across pruning steps.
    """
    batches = list(batches)
    compiled: dict[BertConfig, Callable] = {}

    def gradient_fn(config: BertConfig, params: dict) -> Iterable[dict]:
        if config.num_labels < 1:
            raise ValueError("task_gradient_fn needs a task head (config.num_labels >= 1)")
        if config not in compiled:
            model = Bert(config)

            def loss(p, batch):
                logits = forward(model, p, batch, None).logits
                return task_loss(logits, batch["labels"], batch["example_mask"])

            compiled[config] = jax.jit(jax.grad(loss))
        return (compiled[config](params, batch) for batch in batches)

    return gradient_fn


def prune_units(
    kind: str,
    fraction: float,
    scope: str = "global",
    steps: int = 1,
    *,
    gradient_fn: GradientFn,
    min_per_layer: int = 0,
    normalize: bool = True,
) -> StructureTransform:
    """Structure transform: remove `fraction` of the attention heads (`kind='heads'`, Michel
    et al.'s importance) or FFN neurons (`'ffn'`, gate-gradient importance), then shrink."""
    _check_kind(kind)
    _check_fraction(fraction)
    _check_scope(scope)
    _check_count("steps", steps, 1)
    _check_count("min_per_layer", min_per_layer, 0)
    if not callable(gradient_fn):
        raise ValueError(
            f"gradient_fn must be callable (config, params) -> grads, got {gradient_fn!r}"
        )

    def transform(config: BertConfig, params: dict) -> tuple[BertConfig, dict]:
        keep = iterative_prune(
            config, params, gradient_fn, fraction, kind, steps, scope, min_per_layer, normalize
        )
        return shrink(config, params, **{"head_keep" if kind == "heads" else "ffn_keep": keep})

    return transform


def prune_heads(
    fraction: float,
    scope: str = "global",
    steps: int = 1,
    *,
    gradient_fn: GradientFn,
    min_per_layer: int = 0,
    normalize: bool = True,
) -> StructureTransform:
    """Structure transform removing the least important attention heads (Michel et al.).

    Args:
      fraction: the share of all heads to remove, rounded to whole heads.
      scope: 'global' ranks heads across layers; 'layer' removes `fraction` of each layer.
      steps: rounds of scoring and removal (iterative pruning); 1 is one-shot.
      gradient_fn: (config, params) -> gradient trees of the task loss, one per batch, e.g.
        `task_gradient_fn(batches)`.
      min_per_layer: heads every layer keeps at least.
      normalize: L2-normalise importance per layer before ranking.

    Returns:
      A `(config, params) -> (config, params)` transform whose model has the heads removed
      (`shrink`).
    """
    return prune_units(
        "heads",
        fraction,
        scope,
        steps,
        gradient_fn=gradient_fn,
        min_per_layer=min_per_layer,
        normalize=normalize,
    )


def prune_ffn(
    fraction: float,
    scope: str = "global",
    steps: int = 1,
    *,
    gradient_fn: GradientFn,
    min_per_layer: int = 0,
    normalize: bool = True,
) -> StructureTransform:
    """Structure transform removing the least important FFN neurons (gate-gradient importance).

    Args:
      fraction: the share of all FFN neurons to remove, rounded to whole neurons.
      scope: 'global' ranks neurons across layers; 'layer' removes `fraction` of each layer.
      steps: rounds of scoring and removal (iterative pruning); 1 is one-shot.
      gradient_fn: (config, params) -> gradient trees of the task loss, one per batch, e.g.
        `task_gradient_fn(batches)`.
      min_per_layer: neurons every layer keeps at least.
      normalize: L2-normalise importance per layer before ranking.

    Returns:
      A `(config, params) -> (config, params)` transform whose model has the neurons removed
      (`shrink`).
    """
    return prune_units(
        "ffn",
        fraction,
        scope,
        steps,
        gradient_fn=gradient_fn,
        min_per_layer=min_per_layer,
        normalize=normalize,
    )
