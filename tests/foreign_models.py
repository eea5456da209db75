"""Four models the package never saw, for the foreign conformance suite: linen MLP, CNN,
Transformer block with DenseGeneral attention, and an nnx MLP, each with its runners."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.compress.intercept import low_rank_layers, use_low_rank
from jaxcompress.compress.quant.activations import calibrate, quantized_inputs


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(4)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


class Block(nn.Module):
    """A pre-norm Transformer block: DenseGeneral attention and a Dense MLP."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)
        h = nn.relu(nn.Dense(32, name="up")(nn.LayerNorm()(x)))
        x = x + nn.Dense(16, name="down")(h)
        return nn.Dense(4, name="head")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)])
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.out(x)


@dataclasses.dataclass(frozen=True)
class Foreign:
    """A model as a user holds it: its params, one batch, and how to run it under a context.

    `low_rank` selects the 2-D dense kernels that can run factors; `conv` is a kernel that
    cannot (or None); `tie` names two same-shaped modules.
    """

    name: str
    params: Any
    x: jax.Array
    apply: Callable[[Any, jax.Array], jax.Array]
    low_rank: str
    tie: tuple[str, str]
    refused: str | None = None  # a kernel low rank must refuse (conv, DenseGeneral 3-D)
    module: nnx.Module | None = None  # the nnx model, None for linen

    def low_rank_apply(self, factored: Any) -> Callable:
        """`(params, x) -> y` running the factors of `factored` as two matmuls."""
        if self.module is None:

            def run(p, x):
                with low_rank_layers():
                    return self.apply(p, x)

            return run
        model = use_low_rank(nnx.clone(self.module), factored)
        graphdef = nnx.split(model, nnx.Param)[0]
        return lambda p, x: nnx.merge(graphdef, p)(x)

    def quantized_inputs(self, rules: list, ranges: dict):
        """The interception context; run `live` inside it (nnx layers are swapped on entry,
        which an nnx model allows outside a trace only)."""
        return quantized_inputs(rules, ranges, model=self.module)

    def live(self, p, x):
        """`apply`, intercepted by any context active while it is traced."""
        if self.module is None:
            return self.apply(p, x)
        # split inside the context: the graphdef holds the intercepting classes
        return nnx.merge(nnx.split(self.module, nnx.Param)[0], p)(x)

    @functools.cached_property
    def ranges(self) -> dict[str, jax.Array]:
        """The calibrated input absmax of every Dense/DenseGeneral/Conv/Linear layer."""
        return calibrate(lambda x: self.live(self.params, x), [self.x], model=self.module)

    @functools.cached_property
    def reference(self) -> Callable:
        return jax.jit(self.apply)


def _linen(name: str, module: nn.Module, x: jax.Array, **kw) -> Foreign:
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]
    return Foreign(name, params, x, lambda p, x: module.apply({"params": p}, x), **kw)


def _nnx() -> Foreign:
    module = NnxMLP(nnx.Rngs(0))
    graphdef, params = nnx.split(module, nnx.Param)

    def apply(p, x):
        return nnx.merge(graphdef, p)(x)

    x = jax.random.normal(jax.random.key(1), (4, 16))
    return Foreign(
        "nnx_mlp", params, x, apply, r"layers/\d/kernel", ("layers/0", "layers/1"), module=module
    )


@functools.cache
def foreign(name: str) -> Foreign:
    """The model called `name`, built once per test session."""
    if name == "nnx_mlp":
        return _nnx()
    if name == "mlp":
        x = jax.random.normal(jax.random.key(1), (4, 16))
        return _linen(name, MLP(), x, low_rank="Dense_[01]/kernel", tie=("Dense_0", "Dense_1"))
    if name == "cnn":
        x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
        return _linen(
            name, CNN(), x, low_rank="Dense_0/kernel", tie=("Conv_1", "Conv_2"), refused="Conv_1"
        )
    x = jax.random.normal(jax.random.key(3), (2, 4, 16))
    return _linen(
        name,
        Block(),
        x,
        low_rank="(up|down)/kernel",
        tie=("attn/query", "attn/key"),
        refused="attn/query",
    )


MODELS = ("mlp", "cnn", "transformer", "nnx_mlp")
