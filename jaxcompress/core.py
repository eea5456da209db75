"""The transform contract: path rules, structure transforms, training-time reparameterizations.

Two kinds of transform:

- A *structure transform* is a pure `(config, params) -> (config, params)` that runs once
  (factorize embeddings, share layers, low-rank, drop layers, remove pruned heads). Extra
  hyperparameters are bound by a factory or `functools.partial`; `compose` chains them.
- A *reparameterization* is a `Reparam`, optax-style: `init(params) -> state`,
  `apply(params, state) -> params` (what the forward pass sees), and
  `update(params, state, step) -> state` (non-gradient state such as masks, on a schedule).
  The state lives in the train state pytree. `chain` composes them.

Which parameters a transform touches is chosen by *rules*: an ordered list of
`(regex, spec or None)` matched with `re.fullmatch` against the '/'-joined parameter path;
the first match wins and `None` means "leave alone". A rule that selects nothing is an error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

log = logging.getLogger(__name__)

Params = Any
State = Any
Rules = Sequence[tuple[str, Any]]
StructureTransform = Callable[[Any, Params], tuple[Any, Params]]


def key_str(key: Any) -> str:
    """One component of a `jax.tree_util` key path as a string."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: Sequence[Any]) -> str:
    """A `jax.tree_util` key path as 'a/b/0/kernel'."""
    return "/".join(key_str(k) for k in key_path)


def leaf_paths(params: Params) -> list[str]:
    """Every leaf's '/'-joined path, in tree order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def match_rules(params: Params, rules: Rules, name: str = "rules") -> dict[str, Any]:
    """The spec of every selected leaf path: first `re.fullmatch` wins, `None` skips.

    Raises if a rule selects no parameter (it matched nothing, or earlier rules took all
    its matches): a silent no-op rule is almost always a typo.
    """
    compiled = []
    for pattern, spec in rules:
        try:
            compiled.append((re.compile(pattern), spec))
        except re.error as e:
            raise ValueError(f"{name}: bad regex {pattern!r}: {e}") from None
    hits = [0] * len(compiled)
    selected: dict[str, Any] = {}
    paths = leaf_paths(params)
    for path in paths:
        for i, (regex, spec) in enumerate(compiled):
            if regex.fullmatch(path):
                hits[i] += 1
                if spec is not None:
                    selected[path] = spec
                break
    unused = [rules[i][0] for i, n in enumerate(hits) if n == 0]
    if unused:
        sample = ", ".join(paths[:4])
        raise ValueError(
            f"{name}: rule(s) {unused} selected no parameter (fullmatch on '/'-joined paths "
            f"such as {sample}, ...)"
        )
    for (pattern, spec), n in zip(rules, hits, strict=True):
        log.info("%s: %r -> %s matched %d parameter(s)", name, pattern, spec, n)
    return selected


def map_rules(
    fn: Callable[[str, jax.Array, Any], jax.Array],
    params: Params,
    rules: Rules,
    name: str = "rules",
) -> Params:
    """Replace each selected leaf by `fn(path, leaf, spec)`; other leaves are kept as they are."""
    selected = match_rules(params, rules, name)

    def visit(key_path, leaf):
        path = path_str(key_path)
        return fn(path, leaf, selected[path]) if path in selected else leaf

    return jax.tree_util.tree_map_with_path(visit, params)


def compose(*transforms: StructureTransform) -> StructureTransform:
    """Structure transforms applied left to right."""

    def composed(config, params):
        for transform in transforms:
            config, params = transform(config, params)
        return config, params

    return composed


class Reparam(NamedTuple):
    """A training-time reparameterization; all three functions are pure and jit-able."""

    init: Callable[[Params], State]
    apply: Callable[[Params, State], Params]
    update: Callable[[Params, State, jax.Array], State]


def identity() -> Reparam:
    """The reparameterization that changes nothing."""
    return Reparam(
        init=lambda params: (),
        apply=lambda params, state: params,
        update=lambda params, state, step: state,
    )


def chain(*reparams: Reparam) -> Reparam:
    """Reparameterizations applied in order; `update` sees the params as each one receives them."""

    def init(params):
        states = []
        for r in reparams:
            states.append(r.init(params))
            params = r.apply(params, states[-1])
        return tuple(states)

    def apply(params, state):
        for r, s in zip(reparams, state, strict=True):
            params = r.apply(params, s)
        return params

    def update(params, state, step):
        new = []
        for r, s in zip(reparams, state, strict=True):
            new.append(r.update(params, s, step))
            params = r.apply(params, new[-1])
        return tuple(new)

    return Reparam(init, apply, update)
