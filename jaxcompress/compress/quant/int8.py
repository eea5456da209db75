"""Quantized Dense execution: int8 x int8 -> int32 or e4m3 x e4m3 -> f32 matmuls, one rescale."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.compress.quant.pack import read, unpack
from jaxcompress.compress.quant.qat import FP8 as FP8_SPEC
from jaxcompress.compress.quant.qat import INT8, SPLIT_SUFFIX
from jaxcompress.compress.quant.quantizers import (
    FP8,
    FP8_INV_MAX,
    FP8_MAX,
    QTensor,
    QuantSpec,
    quantize,
)

ACT_QMAX = 127  # activations: symmetric int8, absmax scale


class Int8Weight(NamedTuple):
    """A Dense kernel as int8 codes [in, out] and its scales (QuantSpec scale shapes)."""

    codes: jax.Array  # int8 [in, out]
    scale: jax.Array  # float32: (), (out,) or (in // group_size, out)


def int8_weight(qt: QTensor, spec: QuantSpec) -> Int8Weight:
    """The integer form of a symmetric (or ternary/binary) 2-D kernel quantized by `spec`."""
    if spec.scheme == "asymmetric":
        raise ValueError("int8 execution needs symmetric weights (no zero point)")
    if spec.scheme == "fp8":
        raise ValueError("int8 execution needs integer codes; run fp8 weights with fp8_weight")
    if qt.codes.ndim != 2:
        raise ValueError(f"int8 execution needs a 2-D kernel, got shape {qt.codes.shape}")
    return Int8Weight(qt.codes.astype(jnp.int8), jnp.asarray(qt.scale, jnp.float32))


class Fp8Weight(NamedTuple):
    """A Dense kernel as float8 e4m3 values [in, out] and its scales (QuantSpec scale shapes).

    Attributes:
      codes: float8_e4m3fn [in, out], the kernel divided by its scale.
      scale: float32: (), (out,) or (in // group_size, out).
    """

    codes: jax.Array  # float8_e4m3fn [in, out]
    scale: jax.Array  # float32: (), (out,) or (in // group_size, out)


def fp8_weight(qt: QTensor, spec: QuantSpec) -> Fp8Weight:
    """The fp8 form of a 2-D kernel quantized by an fp8 `spec`.

    Args:
      qt: what `quantize(kernel, spec)` returned (e4m3 codes and scales).
      spec: the spec; its scheme must be 'fp8'.

    Returns:
      The `Fp8Weight`.

    Raises:
      ValueError: `spec` is not fp8, or the kernel is not 2-D.
    """
    if spec.scheme != "fp8":
        raise ValueError(f"fp8 execution needs scheme='fp8' weights, got {spec.scheme!r}")
    if qt.codes.ndim != 2:
        raise ValueError(f"fp8 execution needs a 2-D kernel, got shape {qt.codes.shape}")
    return Fp8Weight(qt.codes.astype(FP8), jnp.asarray(qt.scale, jnp.float32))


def _input_absmax(x: jax.Array, per_token: bool, absmax: jax.Array | None) -> jax.Array:
    """The clip range of a layer input: static (`absmax`, per tensor), else its own absmax
    per token or per tensor; shaped to broadcast against `x`."""
    if absmax is not None:
        return jnp.asarray(absmax, jnp.float32).reshape((1,) * x.ndim)
    if per_token:
        return jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    return jnp.max(jnp.abs(x)).reshape((1,) * x.ndim)


def quantize_activations(
    x: jax.Array, per_token: bool = True, absmax: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of `x` and their scale: one per token (last axis), one per
    tensor, or from a static clip range `absmax` (calibrated; values beyond it clip), the
    quantization of `activations.fake_quant_input` at 8 bits."""
    x = x.astype(jnp.float32)
    scale = _input_absmax(x, per_token, absmax) / ACT_QMAX
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    codes = jnp.clip(jnp.round(x / scale), -ACT_QMAX, ACT_QMAX).astype(jnp.int8)
    return codes, scale


def quantize_activations_fp8(
    x: jax.Array, per_token: bool = True, absmax: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """E4m3 values of `x` / scale and their scale (absmax * float32(1 / 448)): one per token
    or per tensor (the scale of `activations.fake_quant_input_fp8`).

    Args:
      x: the layer input, any float dtype, features on the last axis.
      per_token: one scale per token (row of the last axis); False: one for the tensor.
      absmax: a static clip range (calibrated, per tensor) instead of the input's own.

    Returns:
      The float8_e4m3fn values in `x`'s shape, and the float32 scale shaped to broadcast
      against them ([..., 1], or all ones per tensor); an all-zero input gets scale 1.
    """
    x = x.astype(jnp.float32)
    scale = _input_absmax(x, per_token, absmax) * FP8_INV_MAX
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    values = jnp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(FP8)
    return values, scale


def _scaled_matmul(
    x_q: jax.Array, x_scale: jax.Array, weight: Int8Weight | Fp8Weight, accumulate: jnp.dtype
) -> jax.Array:
    """(x_q * x_scale) @ (weight.codes * weight.scale): a product of the quantized operands
    accumulated in `accumulate` (int32 or float32), then one float32 rescale.

    Group-wise weights (scale (groups, out)) run one product per group of input rows,
    rescaled and summed in float32.
    """
    k, n = weight.codes.shape
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, k)
    if weight.scale.ndim < 2:
        acc = jax.lax.dot_general(
            x2, weight.codes, (((1,), (0,)), ((), ())), preferred_element_type=accumulate
        )
        y = acc.astype(jnp.float32) * x_scale.reshape(-1, 1) * weight.scale
        return y.reshape(*lead, n)
    groups = weight.scale.shape[0]
    x3 = x2.reshape(-1, groups, k // groups)
    w3 = weight.codes.reshape(groups, k // groups, n)
    acc = jax.lax.dot_general(  # (groups, tokens, out)
        x3, w3, (((2,), (1,)), ((1,), (0,))), preferred_element_type=accumulate
    )
    y = jnp.sum(acc.astype(jnp.float32) * weight.scale[:, None, :], axis=0)
    return (y * x_scale.reshape(-1, 1)).reshape(*lead, n)


def int8_matmul(x_codes: jax.Array, x_scale: jax.Array, weight: Int8Weight) -> jax.Array:
    """(x_codes * x_scale) @ (weight codes * weight scale), accumulated exactly in int32.

    Group-wise weights (scale (groups, out)) run one int32 product per group of input rows,
    rescaled and summed in float32.
    """
    return _scaled_matmul(x_codes, x_scale, weight, jnp.int32)


def fp8_matmul(x_values: jax.Array, x_scale: jax.Array, weight: Fp8Weight) -> jax.Array:
    """(x_values * x_scale) @ (weight values * weight scale): `dot_general` on e4m3 operands
    accumulated in float32 (FP8 tensor-core matmuls on Hopper GPUs; on CPU, XLA converts
    the operands to float32 and runs a float32 dot, where each e4m3 product is exact), then
    one rescale.

    Args:
      x_values: float8_e4m3fn activations [..., in].
      x_scale: their float32 scale, per token ([..., 1]) or per tensor.
      weight: the e4m3 kernel and its scales (group-wise: one product per group of rows).

    Returns:
      The float32 product [..., out].
    """
    return _scaled_matmul(x_values, x_scale, weight, jnp.float32)


def int8_dense(
    x: jax.Array,
    weight: Int8Weight,
    bias: jax.Array | None = None,
    per_token: bool = True,
    absmax: jax.Array | None = None,
) -> jax.Array:
    """A Dense layer run on integers: quantize `x` to int8, int8 matmul, rescale, add bias.

    Args:
      x: the layer input [..., in], any float dtype.
      weight: the kernel as int8 codes and scales (`int8_weight`, `int8_weights`).
      bias: the float bias [out], or None.
      per_token: one activation scale per token; False: one per tensor.
      absmax: a static clip range of `x` (calibrated, per tensor): no reduction over `x`.

    Returns:
      The float32 output [..., out].
    """
    return _quantized_dense(quantize_activations, int8_matmul, x, weight, bias, per_token, absmax)


def fp8_dense(
    x: jax.Array,
    weight: Fp8Weight,
    bias: jax.Array | None = None,
    per_token: bool = True,
    absmax: jax.Array | None = None,
) -> jax.Array:
    """A Dense layer run on fp8: `x` to e4m3 with an absmax scale, e4m3 x e4m3 matmul
    accumulated in float32, rescale, add bias.

    Args:
      x: the layer input [..., in], any float dtype.
      weight: the kernel as e4m3 values and scales (`fp8_weight`, `fp8_weights`).
      bias: the float bias [out], or None.
      per_token: one activation scale per token; False: one per tensor.
      absmax: a static clip range of `x` (calibrated, per tensor): no reduction over `x`.

    Returns:
      The float32 output [..., out].
    """
    return _quantized_dense(
        quantize_activations_fp8, fp8_matmul, x, weight, bias, per_token, absmax
    )


def _quantized_dense(quantize_input, matmul, x, weight, bias, per_token, absmax) -> jax.Array:
    values, scale = quantize_input(x, per_token, absmax)
    y = matmul(values, scale, weight)
    return y if bias is None else y + bias.astype(jnp.float32)


def fake_quant_dense(
    x: jax.Array,
    weight: Int8Weight | Fp8Weight,
    bias: jax.Array | None = None,
    per_token: bool = True,
    absmax: jax.Array | None = None,
) -> jax.Array:
    """The float computation `int8_dense` (or `fp8_dense`, for an `Fp8Weight`) stands for:
    dequantized operands, float32 matmul."""
    quantize_input = (
        quantize_activations_fp8 if isinstance(weight, Fp8Weight) else quantize_activations
    )
    x_codes, x_scale = quantize_input(x, per_token, absmax)
    k, n = weight.codes.shape
    scale = (
        weight.scale
        if weight.scale.ndim < 2
        else jnp.repeat(weight.scale, k // weight.scale.shape[0], axis=0)
    )
    w = weight.codes.astype(jnp.float32) * scale
    x_fq = x_codes.astype(jnp.float32) * x_scale
    y = jnp.matmul(x_fq, w, precision=jax.lax.Precision.HIGHEST)
    return y if bias is None else y + bias.astype(jnp.float32)


def _kernel_entries(codes: dict[str, tuple[QTensor, QuantSpec]]):
    """The 2-D kernels of an artefact's codes by path (a BinaryBERT pair is not one matrix)."""
    for path, (qt, spec) in codes.items():
        if qt.codes.ndim == 2 and path.endswith("kernel") and path + SPLIT_SUFFIX not in codes:
            yield path, qt, spec


def _from_kernels(kernels: Mapping[str, jax.Array], spec: QuantSpec, make) -> dict:
    out = {}
    for path, kernel in kernels.items():
        try:
            out[path] = make(quantize(kernel, spec), spec)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return out


def int8_weights(
    source: str | os.PathLike | Mapping[str, jax.Array], spec: QuantSpec = INT8
) -> dict[str, Int8Weight]:
    """The int8 form of every quantized 2-D kernel of a packed artefact, or of float kernels.

    Args:
      source: a packed artefact (`quant_pack.save`): its symmetric, ternary and binary 2-D
        kernels are taken with their stored codes (asymmetric, fp8 and non-kernel entries
        are left out); or float kernels [in, out] by parameter path, quantized by `spec`.
      spec: the spec float kernels are quantized with (an artefact carries its own).

    Returns:
      `Int8Weight`s by kernel path, for `integer_dense_layers` / `IntegerModel`.
    """
    if isinstance(source, Mapping):
        return _from_kernels(source, spec, int8_weight)
    _, codes = unpack(read(source))
    return {
        path: int8_weight(qt, stored)
        for path, qt, stored in _kernel_entries(codes)
        if stored.scheme not in ("asymmetric", "fp8")
    }


def fp8_weights(
    source: str | os.PathLike | Mapping[str, jax.Array], spec: QuantSpec = FP8_SPEC
) -> dict[str, Fp8Weight]:
    """The e4m3 form of every fp8 2-D kernel of a packed artefact, or of float kernels.

    Args:
      source: a packed artefact (`quant_pack.save` with fp8 specs): its fp8 2-D kernels, with
        their stored e4m3 values and scales (other entries are left out); or float kernels
        [in, out] by parameter path, quantized by `spec`.
      spec: an fp8 spec for float kernels (default per output channel, absmax).

    Returns:
      `Fp8Weight`s by kernel path, for `integer_dense_layers(..., scheme='fp8')`.

    Raises:
      ValueError: `spec` is not an fp8 spec, or a kernel is not 2-D.
    """
    if isinstance(source, Mapping):
        return _from_kernels(source, spec, fp8_weight)
    _, codes = unpack(read(source))
    return {
        path: fp8_weight(qt, stored)
        for path, qt, stored in _kernel_entries(codes)
        if stored.scheme == "fp8"
    }


# Execution schemes: the weight type each expects and the dense layer that runs it.
EXECUTION = {"int8": (Int8Weight, int8_dense), "fp8": (Fp8Weight, fp8_dense)}


def _dense_fn(weights: Mapping[str, Int8Weight | Fp8Weight], scheme: str):
    """The dense function of `scheme`, after checking every weight is of its type."""
    if scheme not in EXECUTION:
        raise ValueError(f"scheme={scheme!r}; expected one of {tuple(EXECUTION)}")
    kind, dense = EXECUTION[scheme]
    for path, weight in weights.items():
        if not isinstance(weight, kind):
            raise ValueError(
                f"scheme={scheme!r} runs {kind.__name__}s; {path} is an "
                f"{type(weight).__name__} (build the weights with {scheme}_weights)"
            )
    return dense


@contextlib.contextmanager
def integer_dense_layers(
    weights: Mapping[str, Int8Weight | Fp8Weight],
    per_token: bool = False,
    layer_types: tuple[str, ...] = ("Linear", "Dense"),
    scheme: str = "int8",
    ranges: Mapping[str, float] | None = None,
) -> Iterator[None]:
    """Within this context every dense layer whose kernel path is in `weights` runs quantized
    instead of its float computation; the model itself is not edited (Flax method
    interception). Layers without weights (low-rank factors, float layers) run as before.

    Args:
      weights: `Int8Weight`s (scheme 'int8', from `int8_weights`) or `Fp8Weight`s (scheme
        'fp8', from `fp8_weights`) by kernel path.
      per_token: one activation scale per token; False: one per layer input.
      layer_types: the class names of the dense layers to intercept.
      scheme: 'int8' (`int8_dense`: int8 activations, int8 x int8 -> int32 matmul, rescale,
        float bias) or 'fp8' (`fp8_dense`: e4m3 activations, e4m3 x e4m3 -> float32 matmul,
        rescale, float bias).
      ranges: static clip ranges of the layers' inputs by layer path (the kernel path
        without '/kernel': what `activations.calibrate` returns and a quantize stage's
        quantization.json records); None: each input's own absmax, computed as it runs.

    Yields:
      None; the selected layers called inside the context run on `scheme`.

    Raises:
      ValueError: an unknown scheme, or a weight of the other scheme's type.
    """
    dense = _dense_fn(weights, scheme)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or type(module).__name__ not in layer_types:
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in module.scope.path) + "/kernel"
        if path not in weights:
            return next_fun(*args, **kwargs)
        bias = module.variables["params"].get("bias")
        x = args[0]
        absmax = None
        if ranges is not None:
            layer = path.removesuffix("/kernel")
            if layer not in ranges:
                raise ValueError(
                    f"no calibrated range for {layer}: calibrate the model whose weights these "
                    "are, or pass ranges=None for dynamic ranges"
                )
            absmax = ranges[layer]
        return dense(x, weights[path], bias, per_token, absmax).astype(x.dtype)

    with nn.intercept_methods(interceptor):
        yield


@dataclasses.dataclass(frozen=True)
class IntegerModel:
    """`model` whose dense layers run quantized (`integer_dense_layers`); stands in for it
    wherever `.config` and `.apply` are used (evaluation, latency).

    Attributes:
      model: the float linen model.
      weights: `Int8Weight`s or `Fp8Weight`s by kernel path, matching `scheme`.
      per_token: one activation scale per token; False: one per layer input.
      scheme: 'int8' or 'fp8' (see `integer_dense_layers`).
      ranges: static input clip ranges by layer path, or None (dynamic).
    """

    model: nn.Module
    weights: dict[str, Int8Weight | Fp8Weight]
    per_token: bool = False
    scheme: str = "int8"
    ranges: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        _dense_fn(self.weights, self.scheme)

    @property
    def config(self):
        return self.model.config

    def apply(self, variables: dict, *args, **kwargs):
        with integer_dense_layers(
            self.weights, self.per_token, scheme=self.scheme, ranges=self.ranges
        ):
            return self.model.apply(variables, *args, **kwargs)
