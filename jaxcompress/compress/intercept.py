"""Module-path interception of layer calls in linen and nnx models, and low-rank execution."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import math
import re
import string
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.core import Rules, path_str

LINEN_LAYERS: tuple[type, ...] = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
NNX_LAYERS: tuple[type, ...] = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)
FACTORS = ("kernel_a", "kernel_b")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One intercepted layer call, as a handler sees it."""

    path: str  # '/'-joined module path: the linen scope path or the nnx graph path
    spec: Any  # the spec of the first rule whose regex fullmatches `path` (never None)
    module: Any  # the bound linen module or the nnx module


# handler(layer, call, args, kwargs) -> output; `call(*args, **kwargs)` runs the layer as is.
Handler = Callable[[Layer, Callable[..., Any], tuple, dict], Any]


class _Session:
    """The rules of one interception context: matching, hit counts, the final check."""

    def __init__(self, rules: Rules, name: str):
        self.name = name
        self.rules = list(rules)
        self.compiled = []
        for pattern, _ in self.rules:
            try:
                self.compiled.append(re.compile(pattern))
            except re.error as e:
                raise ValueError(f"{name}: bad regex {pattern!r}: {e}") from None
        self.hits = [0] * len(self.rules)
        self.seen: dict[str, None] = {}  # every candidate layer path, in call order
        self.calls = 0

    def match(self, path: str) -> tuple[int, Any] | None:
        """Counts the first rule matching `path` and returns (index, spec), or None."""
        self.seen[path] = None
        for i, regex in enumerate(self.compiled):
            if regex.fullmatch(path):
                self.hits[i] += 1
                return i, self.rules[i][1]
        return None

    def check(self, nothing: str) -> None:
        """Raises `nothing` if no layer was seen, or names a rule that matched no layer."""
        seen = list(self.seen)
        if not seen:
            raise ValueError(f"{self.name}: {nothing}")
        for (pattern, _), n in zip(self.rules, self.hits, strict=True):
            if n == 0:
                near = difflib.get_close_matches(pattern, seen, n=3, cutoff=0.0) or seen[:3]
                raise ValueError(
                    f"{self.name}: rule {pattern!r} intercepted no layer (re.fullmatch on "
                    f"'/'-joined module paths); nearest paths seen: {near}"
                )


_ACTIVE: dict[int, tuple[_Session, Handler]] = {}
_TOKENS = itertools.count()
_INTERCEPT_ATTR = "_jaxcompress_intercept"
_NNX_CLASSES: dict[type, type] = {}


def _nnx_intercepting(base: type) -> type:
    """A subclass of the nnx layer `base` whose `__call__` goes through the active context."""
    if base not in _NNX_CLASSES:

        def __call__(self, *args, **kwargs):
            token, path, spec_index = getattr(self, _INTERCEPT_ATTR)
            if token not in _ACTIVE:
                return base.__call__(self, *args, **kwargs)
            session, handler = _ACTIVE[token]
            session.calls += 1
            layer = Layer(path, session.rules[spec_index][1], self)
            return handler(layer, lambda *a, **k: base.__call__(self, *a, **k), args, kwargs)

        _NNX_CLASSES[base] = type(base.__name__, (base,), {"__call__": __call__})
    return _NNX_CLASSES[base]


def nnx_layers(model: nnx.Module, layer_types: tuple[type, ...] = NNX_LAYERS) -> dict[str, Any]:
    """Every module of `model` that is an instance of `layer_types`, by '/'-joined graph path."""
    return {
        "/".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, layer_types)
    }


@contextlib.contextmanager
def intercept(
    rules: Rules,
    handler: Handler,
    *,
    model: nnx.Module | None = None,
    layer_types: tuple[type, ...] | None = None,
    accept: Callable[[Any], bool] | None = None,
    name: str = "intercept",
) -> Iterator[None]:
    """Routes calls of the layers chosen by `rules` through `handler` within this context.

    Rules are `(regex, spec or None)` pairs matched with `re.fullmatch` against each layer's
    '/'-joined module path, first match wins, `None` leaves the layer alone (as
    `jaxcompress.core.match_rules` does for parameters). Linen models (`model=None`) are
    intercepted with `flax.linen.intercept_methods` while they are applied in the context,
    at any depth and inside `jax.jit`, `nn.scan` or `nn.remat`. An nnx `model` has the
    selected layers' classes swapped for the duration of the context, so calls of `model`
    (directly, through `nnx.jit`, or split and merged inside `jax.jit`) in it are intercepted.

    Args:
      rules: ordered `(regex, spec or None)` pairs.
      handler: `handler(layer, call, args, kwargs)` returns the layer's output; `call(*args,
        **kwargs)` runs the layer unchanged.
      model: the nnx model whose layers are intercepted; None for linen.
      layer_types: the layer classes that are candidates (default `LINEN_LAYERS` or
        `NNX_LAYERS`); other modules are never intercepted.
      accept: optional predicate on a candidate module; rejected ones are left alone.
      name: what errors call this interception.

    Raises:
      ValueError: when a rule selects no layer (naming the nearest layer paths seen): for
        linen on leaving the context, for nnx on entering it; also when no selected layer
        was called inside the context.
    """
    session = _Session(rules, name)
    token = next(_TOKENS)
    _ACTIVE[token] = (session, handler)
    swapped: list[tuple[Any, type]] = []
    try:
        if model is None:
            types = LINEN_LAYERS if layer_types is None else layer_types

            def interceptor(next_fun, args, kwargs, context):
                module = context.module
                if context.method_name != "__call__" or not isinstance(module, types):
                    return next_fun(*args, **kwargs)
                if accept is not None and not accept(module):
                    return next_fun(*args, **kwargs)
                path = "/".join(str(p) for p in module.scope.path)
                found = session.match(path)
                if found is None or found[1] is None:
                    return next_fun(*args, **kwargs)
                session.calls += 1
                layer = Layer(path, found[1], module)
                return handler(layer, next_fun, args, kwargs)

            with nn.intercept_methods(interceptor):
                yield
        else:
            if not isinstance(model, nnx.Module):
                raise TypeError(f"{name}: model must be an nnx.Module or None, got {type(model)}")
            types = NNX_LAYERS if layer_types is None else layer_types
            for path, module in nnx_layers(model, types).items():
                if accept is not None and not accept(module):
                    continue
                found = session.match(path)
                if found is None or found[1] is None:
                    continue
                swapped.append((module, type(module)))
                setattr(module, _INTERCEPT_ATTR, (token, path, found[0]))
                module.__class__ = _nnx_intercepting(type(module))
            session.check(f"the nnx model has no layer of types {[t.__name__ for t in types]}")
            yield
            if swapped and not session.calls:
                raise ValueError(
                    f"{name}: no selected layer of the nnx model was called inside the context"
                )
        if model is None:
            session.check(
                "no layer was called inside the context (call the model inside it; a function "
                "jitted before the context was entered is not traced again)"
            )
    finally:
        del _ACTIVE[token]
        for module, cls in swapped:
            module.__class__ = cls
            delattr(module, _INTERCEPT_ATTR)


def _has_factors(module: nn.Module) -> bool:
    return all(module.scope.has_variable("params", f) for f in FACTORS)


def _two_matmuls(x, a, b, bias, n_in: int, features: tuple[int, ...], dtype, precision):
    """`x`'s last `n_in` axes contracted with `a` then `b` (both seen as 2-D), plus `bias`."""
    rank = a.shape[-1]
    dtype = dtype or jnp.result_type(x, a, b, *(() if bias is None else (bias,)))
    x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    lead = x.shape[: x.ndim - n_in]
    h = jnp.dot(x.reshape(*lead, -1), a.reshape(-1, rank), precision=precision)
    y = jnp.dot(h, b.reshape(rank, -1), precision=precision).reshape(*lead, *features)
    return y if bias is None else y + bias.astype(dtype)


def _linen_low_rank(layer: Layer, call, args, kwargs):
    module, x = layer.module, args[0]
    if args[1:] or kwargs:
        raise TypeError(f"low_rank_layers: {layer.path} was called with extra arguments")
    scope = module.scope
    a, b = (scope.get_variable("params", f) for f in FACTORS)
    bias = scope.get_variable("params", "bias") if module.use_bias else None
    if isinstance(module, nn.Dense):
        return _two_matmuls(x, a, b, bias, 1, (module.features,), module.dtype, module.precision)
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(f"low_rank_layers: DenseGeneral {layer.path} has batch_dims")
        axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axes = tuple(ax % x.ndim for ax in axes)
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        return _two_matmuls(x, a, b, bias, len(axes), features, module.dtype, module.precision)
    if isinstance(module, nn.Einsum):
        return _einsum_two_factors(layer.path, module, x, a, b, bias)
    raise ValueError(
        f"low_rank_layers: {type(module).__name__} {layer.path} holds kernel_a/kernel_b, but "
        "only Dense, DenseGeneral and Einsum run factors; densify this layer's factors"
    )


def _einsum_two_factors(path: str, module: nn.Einsum, x, a, b, bias):
    """An `Einsum` whose kernel letters are its contracted letters then its output letters
    (e.g. 'bld,dc->blc'), run as two einsums through the rank."""
    equation = module.einsum_str.replace(" ", "")
    operands, out = equation.split("->")
    xs, ks = operands.split(",")
    contracted = "".join(c for c in ks if c in xs and c not in out)
    kept = "".join(c for c in ks if c in out and c not in xs)
    if "." in equation or ks != contracted + kept:
        raise ValueError(
            f"low_rank_layers: Einsum {path} ({equation}) must list its contracted kernel axes "
            "before its output axes, without batch axes or '...'; densify its factors"
        )
    r = next(c for c in string.ascii_letters if c not in equation)
    mid = "".join(c for c in xs if c not in contracted) + r
    shape = tuple(module.shape)
    dtype = module.dtype or jnp.result_type(x, a, b)
    a = a.reshape(*shape[: len(contracted)], -1).astype(dtype)
    b = b.reshape(-1, *shape[len(contracted) :]).astype(dtype)
    h = jnp.einsum(f"{xs},{contracted}{r}->{mid}", x.astype(dtype), a, precision=module.precision)
    y = jnp.einsum(f"{mid},{r}{kept}->{out}", h, b, precision=module.precision)
    if bias is None:
        return y
    return y + bias.astype(dtype).reshape([shape[ks.index(c)] if c in ks else 1 for c in out])


@contextlib.contextmanager
def low_rank_layers(rules: Rules = ((".*", True),)) -> Iterator[None]:
    """Within this context, linen `Dense`, `DenseGeneral` and `Einsum` layers whose params hold
    `kernel_a` and `kernel_b` (`factorize.low_rank_params`) compute
    `(x @ kernel_a) @ kernel_b + bias`.

    The factors are read as 2-D: `kernel_a` (prod of the contracted input axes, rank) and
    `kernel_b` (rank, prod of the features), in either flat or input/feature-shaped form; so
    a `DenseGeneral` kernel reshaped to 2-D before `low_rank_params` runs too. The FLOPs of
    a layer drop when rank < in * out / (in + out). An `Einsum` runs factors when its kernel
    letters are its contracted letters then its output letters ('bld,dc->blc'). Other layers
    holding factors (`Conv`) raise. This context runs the layer itself, so enter it inside
    other interceptions of the same layers (`with quantized_inputs(...): with
    low_rank_layers(): ...`); one entered inside it would not see the call, and its rules raise.

    Args:
      rules: `(regex on the module path, spec or None)`; a layer is intercepted when a rule
        with a non-None spec selects it and its params hold both factors.

    Yields:
      None; linen models applied inside the context run the selected layers' factors.

    Raises:
      ValueError: on leaving the context, when a rule ran no factorized layer.
    """
    with intercept(
        rules,
        _linen_low_rank,
        layer_types=LINEN_LAYERS,
        accept=_has_factors,
        name="low_rank_layers",
    ):
        yield


class LowRankLinear(nnx.Linear):
    """An `nnx.Linear` that holds `kernel_a`, `kernel_b` instead of `kernel` and runs both."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        return _two_matmuls(
            inputs,
            self.kernel_a[...],
            self.kernel_b[...],
            bias,
            1,
            (self.out_features,),
            self.dtype,
            self.precision,
        )


class LowRankLinearGeneral(nnx.LinearGeneral):
    """An `nnx.LinearGeneral` (no batch axes) that runs `kernel_a`, `kernel_b`."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        axes = tuple(ax % inputs.ndim for ax in self.axis)
        x = jnp.moveaxis(inputs, axes, tuple(range(inputs.ndim - len(axes), inputs.ndim)))
        bias = self.bias[...] if self.bias is not None else None
        return _two_matmuls(
            x,
            self.kernel_a[...],
            self.kernel_b[...],
            bias,
            len(axes),
            tuple(self.out_features),
            self.dtype,
            self.precision,
        )


def use_low_rank(model: nnx.Module, params: Any) -> nnx.Module:
    """Makes the nnx `model` run the factors of `params`, in place, and returns it.

    Every layer whose entry in `params` holds `kernel_a`, `kernel_b` (the output of
    `factorize.low_rank_params` on `nnx.state(model)` or its pure dict) loses its `kernel`,
    gains both factors as `nnx.Param`s and runs them as two matmuls; every other leaf of
    `params` is written into the model as `nnx.update` would.

    Args:
      model: an nnx model; its `nnx.Linear` and `nnx.LinearGeneral` layers can be factorized.
      params: a tree with the model's parameter paths (an `nnx.State` or pure dict).

    Returns:
      `model`, whose state now holds the factors.
    """
    flat = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(key_path)
        flat[path.removesuffix("/value")] = leaf
    factored = sorted({p.rsplit("/", 1)[0] for p in flat if p.endswith("/kernel_a")})
    layers = nnx_layers(model, (nnx.Module,))
    for path in factored:
        module = layers.get(path)
        if path + "/kernel_b" not in flat:
            raise ValueError(f"use_low_rank: {path}/kernel_a has no {path}/kernel_b")
        if type(module) is nnx.Linear:
            cls = LowRankLinear
        elif type(module) is nnx.LinearGeneral and not module.batch_axis:
            cls = LowRankLinearGeneral
        else:
            kind = "no module" if module is None else type(module).__name__
            raise ValueError(
                f"use_low_rank: {path} holds kernel_a/kernel_b but is {kind}; only nnx.Linear "
                "and nnx.LinearGeneral without batch axes run factors"
            )
        a, b = flat[path + "/kernel_a"], flat[path + "/kernel_b"]
        if math.prod(a.shape[:-1]) * math.prod(b.shape[1:]) != module.kernel[...].size:
            raise ValueError(
                f"use_low_rank: {path} factors {a.shape} @ {b.shape} do not cover its kernel "
                f"{module.kernel[...].shape}"
            )
        del module.kernel
        module.kernel_a, module.kernel_b = nnx.Param(a), nnx.Param(b)
        module.__class__ = cls
    nnx.update(model, params)
    return model
