"""Quantization-aware training as a `core.Reparam`: rules choose a `QuantSpec` per parameter."""

from __future__ import annotations

import ast
from typing import Any

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

# LSQ steps are trainable, so they live in the params tree beside their weight, under the
# weight's key plus this suffix; `qat(...).apply` consumes them and returns the model's tree.
LSQ_SUFFIX = "@lsq_step"
# BinaryBERT's second binary half of a split weight lives beside it under this suffix; the
# weight the model sees is binary(weight) + binary(weight@binary_split).
SPLIT_SUFFIX = "@binary_split"

EMBEDDINGS = r"bert/embeddings/(word|position|token_type)_embeddings"
KERNEL_LEAF = r"(kernel|kernel_a|kernel_b)"  # dense kernels and low-rank factors
KERNELS = rf".*/{KERNEL_LEAF}|bert/embeddings/embedding_projection"
INT8 = QuantSpec(bits=8)  # per output channel, absmax
INT8_TENSOR = QuantSpec(bits=8, granularity="tensor")


def default_rules(
    kernels: QuantSpec | None = INT8, embeddings: QuantSpec | None = INT8_TENSOR
) -> list[tuple[str, QuantSpec | None]]:
    """Rules for our BERT: every dense kernel (low-rank factors and ALBERT's projection
    included) and the embedding tables get their own spec; LayerNorm and biases stay float."""
    return [(EMBEDDINGS, embeddings), (KERNELS, kernels), (".*", None)]


def _check_rules(rules: core.Rules) -> None:
    for pattern, spec in rules:
        if spec is not None and not isinstance(spec, QuantSpec):
            raise ValueError(f"qat rule {pattern!r}: expected a QuantSpec or None, got {spec!r}")


def strip_suffix(params: core.Params, suffix: str) -> tuple[core.Params, dict[str, jax.Array]]:
    """`params` without the leaves whose key ends in `suffix`, and those leaves by the path
    of the weight they belong to (the key without the suffix)."""
    side: dict[str, jax.Array] = {}

    def strip(tree: Any, prefix: str) -> Any:
        if isinstance(tree, dict):
            out = {}
            for key, value in tree.items():
                name = str(key)
                if name.endswith(suffix):
                    side[prefix + name.removesuffix(suffix)] = value
                else:
                    out[key] = strip(value, f"{prefix}{name}/")
            return out
        if isinstance(tree, list | tuple):
            return type(tree)(strip(v, f"{prefix}{i}/") for i, v in enumerate(tree))
        return tree

    return strip(params, ""), side


def split_lsq_steps(params: core.Params) -> tuple[core.Params, dict[str, jax.Array]]:
    """The model's params without LSQ steps, and the steps by their weight's path."""
    return strip_suffix(params, LSQ_SUFFIX)


def _insert_beside(tree: Any, side: dict[str, jax.Array], suffix: str, prefix: str = "") -> Any:
    """`tree` with `side[path]` added as the sibling `key + suffix` of each leaf at `path`."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out[key] = _insert_beside(value, side, suffix, path + "/")
        if path in side:
            out[f"{key}{suffix}"] = side[path]
    return out


def add_lsq_steps(params: core.Params, rules: core.Rules) -> core.Params:
    """`params` plus an LSQ step (LSQ's initialization) beside every weight whose spec has
    scale_method='lsq'; train the result, and `qat(rules).apply` uses and drops the steps."""
    _check_rules(rules)
    model, old = split_lsq_steps(params)
    selected = core.match_rules(model, rules, name="qat")
    flat = {core.path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(model)[0]}
    lsq = {path: spec for path, spec in selected.items() if spec.scale_method == "lsq"}
    steps = {p: old[p] if p in old else lsq_init(flat[p], spec) for p, spec in lsq.items()}

    result = _insert_beside(model, steps, LSQ_SUFFIX)
    if missing := sorted(set(steps) - set(split_lsq_steps(result)[1])):
        raise ValueError(f"LSQ steps need a dict parent; cannot place them for {missing}")
    return result


def add_binary_split(params: core.Params, rules: core.Rules) -> core.Params:
    """BinaryBERT's ternary weight splitting as the start of binary training: every weight
    whose spec is binary becomes two latent halves (`key`, `key@binary_split`) such that
    binary(half_a) + binary(half_b) equals the ternary quantization of the weight at the
    same granularity. Train the result with `qat(rules)`: at step 0 the binary model
    computes what the ternary model did (exactly so when the input is already ternary)."""
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

    return _insert_beside(jax.tree_util.tree_map_with_path(split, model), halves, SPLIT_SUFFIX)


def _with_path(path: str, fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def quantize_tree(
    params: core.Params, rules: core.Rules
) -> tuple[core.Params, dict[str, tuple[QTensor, QuantSpec]]]:
    """The model's params (LSQ steps removed) and the codes of every selected weight."""
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
    are trained (LSQ steps, which `add_lsq_steps` puts in the params tree).
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

    return core.Reparam(init, apply, update)


def parse_spec(text: str) -> QuantSpec | None:
    """`"bits=4,granularity='group',group_size=128"` -> that QuantSpec; '' -> None (float)."""
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
    except TypeError as e:
        raise ValueError(f"quantization spec {text!r}: {e}") from None


def rules_from_config(quantize: Any) -> list[tuple[str, QuantSpec | None]] | None:
    """The QAT rules of a config's `quantize` section, or None when nothing is quantized."""
    kernels, embeddings = parse_spec(quantize.kernels), parse_spec(quantize.embeddings)
    extra = [(pattern, parse_spec(text)) for pattern, text in quantize.rules]
    if kernels is None and embeddings is None and all(s is None for _, s in extra):
        return None
    return extra + default_rules(kernels, embeddings)
