"""Quantization-aware training as a `core.Reparam`: rules choose a `QuantSpec` per parameter."""

from __future__ import annotations

import ast

import jax

from jaxcompress import core
from jaxcompress.compress.quant.quantizers import (
    QTensor,
    QuantSpec,
    fake_quant,
    lsq_fake_quant,
    lsq_init,
    quantize,
    ternary_split,
)
from jaxcompress.compress.tree import add_beside, strip_suffix

# LSQ steps are trainable, so they live in the params tree beside their weight, under the
# weight's key plus this suffix; `qat(...).apply` consumes them and returns the model's tree.
LSQ_SUFFIX = "@lsq_step"
# BinaryBERT's second binary half of a split weight lives beside it under this suffix; the
# weight the model sees is binary(weight) + binary(weight@binary_split).
SPLIT_SUFFIX = "@binary_split"

# A dense or conv kernel, or a low-rank factor of one; nnx Variables add a '/value' key.
KERNEL_LEAF = r"(kernel|kernel_a|kernel_b)"
KERNELS = rf"(.*/)?{KERNEL_LEAF}(/value)?"
INT8 = QuantSpec(bits=8)  # per output channel, absmax
INT8_TENSOR = QuantSpec(bits=8, granularity="tensor")
FP8 = QuantSpec(scheme="fp8")  # e4m3 values, per output channel, absmax


def default_rules(kernels: QuantSpec | None = INT8) -> list[tuple[str, QuantSpec | None]]:
    """Rules for any model: every `kernel` leaf (dense and conv kernels, low-rank factors)
    gets `kernels`; everything else (biases, norms, embeddings) stays float.

    Args:
      kernels: the spec of every kernel; BERT's preset, which quantizes its embedding tables
        too, is `models.bert_rules.weight_rules(kernels, embeddings)`.

    Returns:
      Rules for `qat`, `quantize_tree` and `pack.save` (top level: `jaxcompress.kernel_rules`).
    """
    return [(KERNELS, kernels)]


def _check_rules(rules: core.Rules) -> None:
    for pattern, spec in rules:
        if spec is not None and not isinstance(spec, QuantSpec):
            raise ValueError(f"qat rule {pattern!r}: expected a QuantSpec or None, got {spec!r}")


def split_lsq_steps(params: core.Params) -> tuple[core.Params, dict[str, jax.Array]]:
    """The model's params without LSQ steps, and the steps by their weight's path."""
    return strip_suffix(params, LSQ_SUFFIX)


def add_lsq_steps(params: core.Params, rules: core.Rules) -> core.Params:
    """`params` plus an LSQ step (LSQ's initialization) beside every weight whose spec has
    scale_method='lsq'; train the result, and `qat(rules).apply` uses and drops the steps.

    Args:
      params: any parameter tree; steps already present are kept.
      rules: `(regex, QuantSpec or None)` on the '/'-joined leaf paths.

    Returns:
      The tree in the input's structure plus, in the mapping holding each LSQ weight `key`,
      the entry `key@lsq_step` (an `nnx.Variable` of the weight's type in an nnx.State).

    Raises:
      ValueError: an LSQ weight sits in a list or tuple (its step has no key to go under).
    """
    _check_rules(rules)
    model, old = split_lsq_steps(params)
    selected = core.match_rules(model, rules, name="qat")
    flat = {core.path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(model)[0]}
    lsq = {path: spec for path, spec in selected.items() if spec.scale_method == "lsq"}
    steps = {p: old[p] if p in old else lsq_init(flat[p], spec) for p, spec in lsq.items()}

    return add_beside(model, steps, LSQ_SUFFIX)


def add_binary_split(params: core.Params, rules: core.Rules) -> core.Params:
    """BinaryBERT's ternary weight splitting as the start of binary training: every weight
    whose spec is binary becomes two latent halves (`key`, `key@binary_split`) such that
    binary(half_a) + binary(half_b) equals the ternary quantization of the weight at the
    same granularity. Train the result with `qat(rules)`: at step 0 the binary model
    computes what the ternary model did (exactly so when the input is already ternary).

    Args:
      params: any parameter tree, not split yet.
      rules: `(regex, QuantSpec or None)`; at least one binary spec must select a weight.

    Returns:
      The tree in the input's structure, each binary weight replaced by its first half and
      the second half added beside it as `key@binary_split`.

    Raises:
      ValueError: a binary weight sits in a list or tuple, or params are already split.
    """
    _check_rules(rules)
    model, old = strip_suffix(params, SPLIT_SUFFIX)
    if old:
        raise ValueError(f"params are already split ({len(old)} weights, e.g. {min(old)})")
    selected = core.match_rules(model, rules, name="qat")
    binary = {path: spec for path, spec in selected.items() if spec.scheme == "binary"}
    if not binary:
        raise ValueError("binary split: no rule selects a weight with scheme='binary'")
    halves: dict[str, jax.Array] = {}

    def split(key_path, w):
        path = core.path_str(key_path)
        if path not in binary:
            return w
        spec = binary[path]
        ternary = QuantSpec(
            scheme="ternary", granularity=spec.granularity, group_size=spec.group_size
        )
        parts = _with_path(path, ternary_split, w, ternary)
        halves[path] = parts.latent_b
        return parts.latent_a

    return add_beside(jax.tree_util.tree_map_with_path(split, model), halves, SPLIT_SUFFIX)


def _with_path(path: str, fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def quantize_tree(
    params: core.Params, rules: core.Rules
) -> tuple[core.Params, dict[str, tuple[QTensor, QuantSpec]]]:
    """The model's params and the codes of every selected weight.

    Args:
      params: any parameter tree, with LSQ steps and binary split halves if trained so.
      rules: `(regex, QuantSpec or None)` on the '/'-joined leaf paths.

    Returns:
      The params in the input's structure with LSQ steps and split halves removed, and the
      `(QTensor, QuantSpec)` of every selected weight (and `path@binary_split` halves) by path.
    """
    _check_rules(rules)
    model, steps, halves = _side_leaves(params)
    selected = core.match_rules(model, rules, name="qat")
    out = {}
    for key_path, w in jax.tree_util.tree_flatten_with_path(model)[0]:
        path = core.path_str(key_path)
        if path in selected:
            spec = selected[path]
            scale = _lsq_step(path, spec, steps)
            out[path] = (_with_path(path, quantize, w, spec, scale), spec)
            if path in halves:
                out[path + SPLIT_SUFFIX] = (_with_path(path, quantize, halves[path], spec), spec)
    return model, out


def _side_leaves(params: core.Params):
    """The model's params, the LSQ steps and the binary split halves, by weight path."""
    model, steps = split_lsq_steps(params)
    model, halves = strip_suffix(model, SPLIT_SUFFIX)
    return model, steps, halves


def _lsq_step(path: str, spec: QuantSpec, steps: dict[str, jax.Array]) -> jax.Array | None:
    if spec.scale_method != "lsq":
        return None
    if path not in steps:
        raise ValueError(
            f"{path}: scale_method='lsq' needs a trained step; "
            "call add_lsq_steps(params, rules) before training"
        )
    return steps[path]


def qat(rules: core.Rules) -> core.Reparam:
    """Fake quantization of the parameters `rules` select, with straight-through gradients.

    Stateless: scales follow the weights at every step (absmax, percentile, MSE search), or
    are trained (LSQ steps, which `add_lsq_steps` puts in the params tree). The stored
    weights are latent and stay float (no `stored_mask`); `finalize` exports the model's
    tree with every selected weight as its codes' values (`fake_quant`), extras dropped.
    Exported at the top level as `jaxcompress.weight_quantization`.

    Args:
      rules: `(regex, QuantSpec or None)` pairs, e.g. `default_rules(QuantSpec(bits=4))`.

    Returns:
      A stateless `core.Reparam` for `core.with_reparam`.

    Raises:
      ValueError: a rule's value is neither a QuantSpec nor None.
    """
    _check_rules(rules)

    def init(params: core.Params) -> tuple:
        return ()

    def apply(params: core.Params, state: tuple) -> core.Params:
        model, steps, halves = _side_leaves(params)

        def fq(path: str, w: jax.Array, spec: QuantSpec) -> jax.Array:
            step = _lsq_step(path, spec, steps)
            if step is not None:
                return _with_path(path, lsq_fake_quant, w, step, spec)
            if path in halves:  # BinaryBERT: the sum of two binary halves
                return _with_path(path, fake_quant, w, spec) + fake_quant(halves[path], spec)
            return _with_path(path, fake_quant, w, spec)

        return core.map_rules(fq, model, rules, name="qat")

    def update(params: core.Params, state: tuple, step: jax.Array) -> tuple:
        return state

    return core.Reparam(init, apply, update, finalize=apply)


def parse_spec(text: str) -> QuantSpec | None:
    """`"bits=4,granularity='group',group_size=128"` -> that QuantSpec; '' -> None (float).

    Args:
      text: `QuantSpec` fields as comma-separated `key=literal` pairs, e.g. "scheme='fp8'".

    Returns:
      The spec, or None for blank text.

    Raises:
      ValueError: one line naming the text and what is wrong with it (syntax, an unknown
        field, a value outside its domain).
    """
    if not text.strip():
        return None
    try:
        call = ast.parse(f"spec({text})", mode="eval").body
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"quantization spec {text!r}: expected key=literal pairs ({e})") from None
    if call.args or None in kwargs:
        raise ValueError(f"quantization spec {text!r}: use key=value pairs only")
    try:
        return QuantSpec(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"quantization spec {text!r}: {e}") from None
