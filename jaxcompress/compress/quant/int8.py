"""Integer execution of quantized Dense layers: int8 x int8 -> int32 matmul, then one rescale."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.compress.quant.pack import read, unpack
from jaxcompress.compress.quant.qat import SPLIT_SUFFIX
from jaxcompress.compress.quant.quantizers import QTensor, QuantSpec

ACT_QMAX = 127  # activations: symmetric int8, absmax scale


class Int8Weight(NamedTuple):
    """A Dense kernel as int8 codes [in, out] and its scales (QuantSpec scale shapes)."""

    codes: jax.Array  # int8 [in, out]
    scale: jax.Array  # float32: (), (out,) or (in // group_size, out)


def int8_weight(qt: QTensor, spec: QuantSpec) -> Int8Weight:
    """The integer form of a symmetric (or ternary/binary) 2-D kernel quantized by `spec`."""
    if spec.scheme == "asymmetric":
        raise ValueError("int8 execution needs symmetric weights (no zero point)")
    if qt.codes.ndim != 2:
        raise ValueError(f"int8 execution needs a 2-D kernel, got shape {qt.codes.shape}")
    return Int8Weight(qt.codes.astype(jnp.int8), jnp.asarray(qt.scale, jnp.float32))


def quantize_activations(x: jax.Array, per_token: bool = True) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of `x` and their scale: one per token (last axis) or per tensor."""
    x = x.astype(jnp.float32)
    if per_token:
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    else:
        amax = jnp.max(jnp.abs(x)).reshape((1,) * x.ndim)
    scale = amax / ACT_QMAX
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    codes = jnp.clip(jnp.round(x / scale), -ACT_QMAX, ACT_QMAX).astype(jnp.int8)
    return codes, scale


def int8_matmul(x_codes: jax.Array, x_scale: jax.Array, weight: Int8Weight) -> jax.Array:
    """(x_codes * x_scale) @ (weight codes * weight scale), accumulated exactly in int32.

    Group-wise weights (scale (groups, out)) run one int32 product per group of input rows,
    rescaled and summed in float32.
    """
    k, n = weight.codes.shape
    lead = x_codes.shape[:-1]
    x2 = x_codes.reshape(-1, k)
    if weight.scale.ndim < 2:
        acc = jax.lax.dot_general(
            x2, weight.codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
        y = acc.astype(jnp.float32) * x_scale.reshape(-1, 1) * weight.scale
        return y.reshape(*lead, n)
    groups = weight.scale.shape[0]
    x3 = x2.reshape(-1, groups, k // groups)
    w3 = weight.codes.reshape(groups, k // groups, n)
    acc = jax.lax.dot_general(  # (groups, tokens, out)
        x3, w3, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32
    )
    y = jnp.sum(acc.astype(jnp.float32) * weight.scale[:, None, :], axis=0)
    return (y * x_scale.reshape(-1, 1)).reshape(*lead, n)


def int8_dense(
    x: jax.Array, weight: Int8Weight, bias: jax.Array | None = None, per_token: bool = True
) -> jax.Array:
    """A Dense layer run on integers: quantize `x` to int8, int8 matmul, rescale, add bias."""
    x_codes, x_scale = quantize_activations(x, per_token)
    y = int8_matmul(x_codes, x_scale, weight)
    return y if bias is None else y + bias.astype(jnp.float32)


def fake_quant_dense(
    x: jax.Array, weight: Int8Weight, bias: jax.Array | None = None, per_token: bool = True
) -> jax.Array:
    """The float computation `int8_dense` stands for: dequantized operands, float32 matmul."""
    x_codes, x_scale = quantize_activations(x, per_token)
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


def int8_weights(path: str | os.PathLike) -> dict[str, Int8Weight]:
    """The int8 form of every quantized 2-D kernel of a packed artefact (`quant_pack.save`),
    by parameter path; asymmetric or non-kernel entries are left out."""
    _, codes = unpack(read(path))
    return {
        path: int8_weight(qt, spec)
        for path, (qt, spec) in codes.items()
        if spec.scheme != "asymmetric"
        and qt.codes.ndim == 2
        and path.endswith("kernel")
        and path + SPLIT_SUFFIX not in codes  # a BinaryBERT pair is not one int8 matrix
    }


@contextlib.contextmanager
def integer_dense_layers(
    weights: dict[str, Int8Weight], per_token: bool = False, layer_types=("Linear", "Dense")
) -> Iterator[None]:
    """Within this context every dense layer whose kernel path is in `weights` runs as
    `int8_dense` (int8 activations, int8 x int8 -> int32 matmul, rescale, float bias) instead
    of its float computation; the model itself is not edited (Flax method interception).
    Layers without int8 weights (low-rank factors, float layers) run as before."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or type(module).__name__ not in layer_types:
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in module.scope.path) + "/kernel"
        if path not in weights:
            return next_fun(*args, **kwargs)
        bias = module.variables["params"].get("bias")
        x = args[0]
        return int8_dense(x, weights[path], bias, per_token).astype(x.dtype)

    with nn.intercept_methods(interceptor):
        yield


@dataclasses.dataclass(frozen=True)
class IntegerModel:
    """`model` whose dense layers run on int8 (`integer_dense_layers`); stands in for it
    wherever `.config` and `.apply` are used (evaluation, latency)."""

    model: nn.Module
    weights: dict[str, Int8Weight]
    per_token: bool = False

    @property
    def config(self):
        return self.model.config

    def apply(self, variables: dict, *args, **kwargs):
        with integer_dense_layers(self.weights, self.per_token):
            return self.model.apply(variables, *args, **kwargs)
