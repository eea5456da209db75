"""Fake-quantized layer inputs by module path, their calibration, and the quantized model view."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress import core
from jaxcompress.compress.intercept import Layer, intercept
from jaxcompress.compress.quant.quantizers import (
    FP8_INV_MAX,
    FP8_ROUNDS_TO_MAX,
    fp8_round,
    straight_through,
)

ACTIVATION_SCHEMES = ("symmetric", "fp8")


def fake_quant_input(x: jax.Array, bits: int, absmax: jax.Array) -> jax.Array:
    """Symmetric fake quantization of activations to `bits` with clip range [-absmax, absmax];
    the straight-through gradient is 1 inside the range and 0 where values are clipped."""
    qmax = 2 ** (bits - 1) - 1
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0).astype(jnp.float32)
    q = jnp.round(jax.lax.stop_gradient(x).astype(jnp.float32) / scale)
    inside = jnp.abs(q) <= qmax
    xq = (jnp.clip(q, -qmax, qmax) * scale).astype(x.dtype)
    return straight_through(x, xq, inside)


def fake_quant_input_fp8(x: jax.Array, absmax: jax.Array) -> jax.Array:
    """Fp8 (e4m3) fake quantization of activations with clip range [-absmax, absmax]: scale
    absmax * float32(1 / 448), values e4m3(x / scale) * scale; the straight-through gradient
    is 1 where e4m3 rounding needs no clipping (|x / scale| <= 448 + half a step), else 0.

    Args:
      x: the layer input.
      absmax: the clip range (calibrated, or the batch's own absmax); <= 0 gives scale 1.

    Returns:
      The fake-quantized input, in `x`'s shape and dtype.
    """
    scale = jnp.where(absmax > 0, absmax * FP8_INV_MAX, 1.0).astype(jnp.float32)
    r = jax.lax.stop_gradient(x).astype(jnp.float32) / scale
    xq = (fp8_round(r) * scale).astype(x.dtype)
    return straight_through(x, xq, jnp.abs(r) <= FP8_ROUNDS_TO_MAX)


def _fake_quant_input(x: jax.Array, bits: int | str, absmax: jax.Array) -> jax.Array:
    if bits == "fp8":
        return fake_quant_input_fp8(x, absmax)
    return fake_quant_input(x, bits, absmax)


def _absmax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(jax.lax.stop_gradient(x))).astype(jnp.float32)


@contextlib.contextmanager
def quantized_inputs(
    rules: core.Rules,
    ranges: dict[str, jax.Array] | None = None,
    *,
    model: nnx.Module | None = None,
    layer_types: tuple[type, ...] | None = None,
) -> Iterator[None]:
    """Within this context the inputs of the layers chosen by `rules` are fake-quantized.

    Symmetric per tensor, with the batch's own absmax (`ranges=None`, dynamic) or the
    calibrated absmax of each layer path (`calibrate`). Candidates are linen `Dense`,
    `DenseGeneral`, `Conv`, `Einsum` (or nnx `Linear`, `LinearGeneral`, `Conv`, `Einsum`
    when `model` is an nnx model), or `layer_types`.

    Args:
      rules: `(regex on the module path, bits or None)`, first `re.fullmatch` wins; bits is
        an int in 2..16 (symmetric integer grid) or 'fp8' (e4m3 values, see
        `fake_quant_input_fp8`).
      ranges: clip range per layer path, or None for dynamic ranges.
      model: the nnx model being called in the context; None for linen models.
      layer_types: the layer classes that are candidates, instead of the defaults.

    Yields:
      None; the selected layers called inside the context see fake-quantized inputs.

    Raises:
      ValueError: for bad bit widths, a selected layer without a calibrated range, or (on
        leaving the context) a rule that quantized no layer.
    """
    for pattern, bits in rules:
        if bits is None or bits == "fp8":
            continue
        if isinstance(bits, bool) or not (isinstance(bits, int) and 2 <= bits <= 16):
            raise ValueError(
                f"quantized_inputs: rule {pattern!r} needs bits in 2..16 or 'fp8', got {bits!r}"
            )

    def handler(layer: Layer, call, args, kwargs):
        x = args[0]
        if ranges is None:
            absmax = _absmax(x)
        elif layer.path in ranges:
            absmax = jnp.asarray(ranges[layer.path], jnp.float32)
        else:
            raise ValueError(
                f"quantized_inputs: no calibrated range for layer {layer.path} (calibrate with "
                "the same rules, or pass ranges=None for dynamic ranges)"
            )
        return call(_fake_quant_input(x, layer.spec, absmax), *args[1:], **kwargs)

    with intercept(rules, handler, model=model, layer_types=layer_types, name="quantized_inputs"):
        yield


def calibrate(
    apply_fn: Callable[[Any], Any],
    batches: Iterable[Any],
    rules: core.Rules = ((".*", True),),
    *,
    model: nnx.Module | None = None,
    layer_types: tuple[type, ...] | None = None,
    jit: bool = True,
) -> dict[str, jax.Array]:
    """The largest input absmax of each layer chosen by `rules` over `batches`.

    Any model, any batch structure: `apply_fn(batch)` runs the float model (linen `apply`
    or an nnx call), and each selected layer reports its input's absmax from inside the
    compiled program (a host callback), so scanned and rematerialized layers count too.
    These are the static ranges of post-training or calibrated quantization-aware training.

    Args:
      apply_fn: called as `apply_fn(batch)`; its output is ignored.
      batches: an iterable of batches (any pytree).
      rules: `(regex on the module path, anything or None)`; None leaves a layer out.
      model: the nnx model `apply_fn` calls; None for linen models.
      layer_types: the layer classes that are candidates, instead of the defaults.
      jit: compile `apply_fn` (a fresh `jax.jit`, traced inside the interception); pass
        False when `apply_fn` is a function jitted inside it, e.g. to keep large params as
        arguments instead of constants.

    Returns:
      The absmax per '/'-joined layer path, as float32 scalars.

    Raises:
      ValueError: when there is no batch, or a rule selects no layer.
    """
    found: dict[str, float] = {}

    def record(path: str, value) -> None:
        found[path] = max(found.get(path, 0.0), float(value))

    def handler(layer: Layer, call, args, kwargs):
        jax.debug.callback(lambda v, path=layer.path: record(path, v), _absmax(args[0]))
        return call(*args, **kwargs)

    run = jax.jit(lambda batch: apply_fn(batch)) if jit else apply_fn
    n = 0
    with intercept(rules, handler, model=model, layer_types=layer_types, name="calibrate"):
        for batch in batches:
            jax.block_until_ready(run(batch))
            n += 1
    if not n:
        raise ValueError("calibrate: batches is empty")
    jax.effects_barrier()
    return {path: jnp.float32(value) for path, value in found.items()}


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """`model` whose `apply` sees `weights.apply(params)` and quantized layer inputs.

    Stands in for the model wherever only `.config` and `.apply` are used (losses, eval).
    Top-level entries of the params named in `passthrough` (e.g. distillation projections)
    are neither quantized nor given to the model's quantization rules.
    """

    model: nn.Module
    weights: core.Reparam
    activation_bits: int = 0
    ranges: dict[str, jax.Array] | None = None
    passthrough: tuple[str, ...] = ("distill",)
    rules: core.Rules | None = None  # the rules of `weights`, for the packed artefact
    layer_bits: dict[str, int] | None = None  # Q-BERT's bits per layer, when chosen
    layer_types: tuple[type, ...] | None = None  # whose inputs are quantized; None: flax's
    # 'symmetric' (integer grid of `activation_bits`) or 'fp8' (e4m3; activation_bits is 8)
    activation_scheme: str = "symmetric"

    def __post_init__(self) -> None:
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"QuantizedModel.activation_scheme={self.activation_scheme!r}; expected one "
                f"of {ACTIVATION_SCHEMES}"
            )
        if self.activation_scheme == "fp8" and self.activation_bits not in (0, 8):
            raise ValueError(
                f"QuantizedModel.activation_bits={self.activation_bits} but fp8 (e4m3) "
                "activations are 8 bits (0: float)"
            )

    @property
    def config(self):
        return self.model.config

    def quantized_params(self, params: dict) -> dict:
        own = {k: v for k, v in params.items() if k not in self.passthrough}
        rest = {k: v for k, v in params.items() if k in self.passthrough}
        return {**self.weights.apply(own, ()), **rest}

    def apply(self, variables: dict, *args, **kwargs):
        variables = {**variables, "params": self.quantized_params(variables["params"])}
        if not self.activation_bits:
            return self.model.apply(variables, *args, **kwargs)
        fp8 = self.activation_scheme == "fp8"
        rules = [(".*", "fp8" if fp8 else self.activation_bits)]
        with quantized_inputs(rules, self.ranges, layer_types=self.layer_types):
            return self.model.apply(variables, *args, **kwargs)
