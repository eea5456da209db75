"""A model seen through quantization: fake-quantized weights and dense-layer inputs, unedited.

Weights go through a `qat` reparameterization; the inputs of every dense layer (modules
whose class name is in `layer_types`, so `nn.Dense` of other projects too) are
fake-quantized by Flax method interception, symmetric per tensor, either with the batch's
own absmax (`ranges=None`, dynamic) or with fixed ranges per layer path from calibration.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress import core
from jaxcompress.compress.quant.quantizers import straight_through

DENSE_TYPES = ("Linear", "Dense")
RANGE_NAME = "input_absmax"


def fake_quant_input(x: jax.Array, bits: int, absmax: jax.Array) -> jax.Array:
    """Symmetric fake quantization of activations to `bits` with clip range [-absmax, absmax];
    the straight-through gradient is 1 inside the range and 0 where values are clipped."""
    qmax = 2 ** (bits - 1) - 1
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0).astype(jnp.float32)
    q = jnp.round(jax.lax.stop_gradient(x).astype(jnp.float32) / scale)
    inside = jnp.abs(q) <= qmax
    xq = (jnp.clip(q, -qmax, qmax) * scale).astype(x.dtype)
    return straight_through(x, xq, inside)


def _layer_path(module: nn.Module) -> str:
    # The scope path: the same path its sown values have in the 'intermediates' collection.
    return "/".join(str(p) for p in module.scope.path)


@contextlib.contextmanager
def quantized_inputs(
    bits: int, ranges: dict[str, jax.Array] | None = None, layer_types=DENSE_TYPES
) -> Iterator[None]:
    """Within this context every dense layer's input is fake-quantized to `bits`."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or type(module).__name__ not in layer_types:
            return next_fun(*args, **kwargs)
        x = args[0]
        if ranges is None:
            absmax = jnp.max(jnp.abs(jax.lax.stop_gradient(x))).astype(jnp.float32)
        else:
            path = _layer_path(module)
            if path not in ranges:
                raise KeyError(f"no calibrated activation range for layer {path}")
            absmax = ranges[path]
        return next_fun(fake_quant_input(x, bits, absmax), *args[1:], **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def recorded_inputs(layer_types=DENSE_TYPES) -> Iterator[None]:
    """Within this context every dense layer sows its input's absmax into 'intermediates'."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and type(module).__name__ in layer_types:
            module.sow("intermediates", RANGE_NAME, jnp.max(jnp.abs(args[0])))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def calibrate(model: nn.Module, params: Any, batches: Iterable[dict]) -> dict[str, jax.Array]:
    """Per dense layer, the largest input absmax over `batches` (float model, no dropout):
    the static activation ranges of post-training or calibrated quantization-aware training."""

    @jax.jit
    def ranges_of(params, batch):
        with recorded_inputs():
            _, state = model.apply(
                {"params": params},
                batch["input_ids"],
                batch["attention_mask"],
                batch["token_type_ids"],
                mutable=["intermediates"],
            )
        flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
        found = {}
        for key_path, value in flat:
            path = core.path_str(key_path)  # '<layer path>/input_absmax/<index>'
            if f"/{RANGE_NAME}/" not in path:
                continue  # what the model itself sows (queries, keys, values)
            layer = path.split(f"/{RANGE_NAME}/")[0]
            found[layer] = jnp.maximum(found.get(layer, 0.0), jnp.max(value))
        return found

    ranges: dict[str, jax.Array] = {}
    for batch in batches:
        for layer, value in ranges_of(params, batch).items():
            ranges[layer] = jnp.maximum(ranges.get(layer, 0.0), value)
    if not ranges:
        raise ValueError("calibration saw no dense layer (or no batch)")
    return ranges


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """`model` whose `apply` sees `weights.apply(params)` and quantized dense inputs.

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
        with quantized_inputs(self.activation_bits, self.ranges):
            return self.model.apply(variables, *args, **kwargs)
