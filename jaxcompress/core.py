"""The transform contract: path rules, structure transforms, training-time reparameterizations.

Two kinds of transform:

- A *structure transform* is a pure `(config, params) -> (config, params)` that runs once
  (factorize embeddings, share layers, low-rank, drop layers, remove pruned heads). Extra
  hyperparameters are bound by a factory or `functools.partial`; `compose` chains them.
- A *reparameterization* is a `Reparam`, optax-style: `init(params) -> state`,
  `apply(params, state) -> params` (what the forward pass sees), and
  `update(params, state, step) -> state` (non-gradient state such as masks, on a schedule).
  `chain` composes them; `with_reparam` keeps their state inside an optax state.

Which parameters a transform touches is chosen by *rules*: an ordered list of
`(regex, spec or None)` matched with `re.fullmatch` against the '/'-joined parameter path;
the first match wins and `None` means "leave alone". A rule that selects nothing is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import FrozenDict

log = logging.getLogger(__name__)

Params = Any
State = Any
Rules = Sequence[tuple[str, Any]]
StructureTransform = Callable[[Any, Params], tuple[Any, Params]]
# Training-time methods keep their trainable extras (movement scores, LSQ steps) in the params
# tree beside their weight, under the weight's key plus '@' and a name.
EXTRA_MARK = "@"


def key_str(key: Any) -> str:
    """One component of a `jax.tree_util` key path as a string."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: Sequence[Any]) -> str:
    """A `jax.tree_util` key path as 'a/b/0/kernel'.

    The final `.value` of an `nnx.Variable` (or of a linen `nn.Partitioned` box) is left
    out, so that an `nnx.State`, a boxed and a plain linen tree of the same model share their
    paths (and their rules).
    """
    keys = list(key_path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(key_str(k) for k in keys)


def leaves_by_path(params: Params) -> dict[str, Any]:
    """Every leaf by its '/'-joined path, in tree order."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def leaf_paths(params: Params) -> list[str]:
    """Every leaf's '/'-joined path, in tree order: the strings that rules are matched against.

    Args:
      params: any pytree (nested dicts, FrozenDict, lists and tuples, int keys, nnx.State);
        the final `.value` of an `nnx.Variable` is not part of a path.

    Returns:
      The paths, one per leaf, such as 'layers/0/dense/kernel' (keys and list indices).
    """
    return list(leaves_by_path(params))


def map_with_path(fn: Callable[..., Any], tree: Params, *rest: Params) -> Params:
    """`jax.tree_util.tree_map_with_path` whose `fn` gets the '/'-joined path string."""
    return jax.tree_util.tree_map_with_path(lambda p, *x: fn(path_str(p), *x), tree, *rest)


def like(params: Params, values: dict[str, Any], fill: Callable[[Any], Any]) -> Params:
    """A tree shaped like `params`: `values[path]` at each leaf path it names, else
    `fill(leaf)` (a fresh array per leaf, so that no two leaves share a buffer)."""
    return map_with_path(lambda path, x: values[path] if path in values else fill(x), params)


def _unused_rule_message(pattern: str, regex: re.Pattern, paths: list[str]) -> str:
    if any(regex.fullmatch(p) for p in paths):
        return f"{pattern!r} only matches paths that earlier rules already took"
    nearest = difflib.get_close_matches(pattern, paths, n=3, cutoff=0.0)
    return (
        f"{pattern!r} matches no path (nearest: {', '.join(nearest) or 'none, the tree is empty'})"
    )


_REPORTED: set[tuple[str, str, str, int]] = set()


def match_rules(params: Params, rules: Rules, name: str = "rules") -> dict[str, Any]:
    """The spec of every selected leaf path: first `re.fullmatch` wins, `None` skips.

    Args:
      params: any pytree (nested dicts, FrozenDict, lists and tuples, int keys, nnx.State).
      rules: ordered `(regex, spec)` pairs matched against the '/'-joined leaf paths.
      name: what the rules are for, in messages.

    Returns:
      `{path: spec}` for every leaf whose first matching rule has a spec other than None.

    Raises:
      ValueError: a regex does not compile, or a rule selects no parameter (it matches no
        path, and the nearest real paths are named; or earlier rules took all its matches):
        a silent no-op rule is almost always a typo.
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
    unused = [i for i, n in enumerate(hits) if n == 0]
    if unused:
        reasons = "; ".join(
            _unused_rule_message(rules[i][0], compiled[i][0], paths) for i in unused
        )
        raise ValueError(
            f"{name}: rule(s) {[rules[i][0] for i in unused]} selected no parameter "
            f"(re.fullmatch on '/'-joined paths): {reasons}"
        )
    for (pattern, spec), n in zip(rules, hits, strict=True):
        line = (name, pattern, repr(spec), n)
        if line not in _REPORTED:  # trees are matched again at every apply: say each rule once
            _REPORTED.add(line)
            log.info("%s: %r -> %s matched %d parameter(s)", name, pattern, spec, n)
    return selected


def map_rules(
    fn: Callable[[str, jax.Array, Any], jax.Array],
    params: Params,
    rules: Rules,
    name: str = "rules",
) -> Params:
    """Replace each selected leaf by `fn(path, leaf, spec)`; other leaves are kept as they are.

    Args:
      fn: `(path, leaf, spec) -> new leaf`, called once per selected leaf.
      params: any pytree, as for `match_rules`.
      rules: ordered `(regex, spec)` pairs; the first `re.fullmatch` wins, `None` skips.
      name: what the rules are for, in messages.

    Returns:
      A tree of the same structure as `params`, with the selected leaves replaced.

    Raises:
      ValueError: as `match_rules` (a bad regex, or a rule that selects no parameter).
    """
    selected = match_rules(params, rules, name)
    return map_with_path(lambda p, x: fn(p, x, selected[p]) if p in selected else x, params)


KeyPath = tuple[Any, ...]
# edit(key path of the mapping, its entries with their subtrees already edited) -> new entries
Edit = Callable[[KeyPath, dict[Any, Any]], dict[Any, Any]]


def is_entry(x: Any) -> bool:
    """Whether `x` holds one weight: an array leaf, or an `nnx.Variable` wrapping one."""
    if isinstance(x, nnx.Variable):
        return True
    return x is not None and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


def _items(node: Mapping) -> dict[Any, Any]:
    # nnx.State keeps its nested levels as plain dicts; walking those rebuilds it exactly.
    return dict(node.raw_mapping if isinstance(node, nnx.State) else node)


def _mapping_like(node: Mapping, items: dict[Any, Any]) -> Mapping:
    if isinstance(node, nnx.State):
        return type(node)(items)
    if isinstance(node, FrozenDict):
        return FrozenDict(items)
    return items if type(node) is dict else type(node)(items)


def edit_mappings(tree: Params, edit: Edit) -> Params:
    """`tree` with the entries of every mapping (dict, FrozenDict, nnx.State) replaced by
    `edit(key_path, entries)`, innermost mappings first; other nodes keep their type."""

    def walk(node: Any, prefix: KeyPath) -> Any:
        if node is None or is_entry(node):
            return node
        if isinstance(node, Mapping):
            items = {
                k: walk(v, (*prefix, jax.tree_util.DictKey(k))) for k, v in _items(node).items()
            }
            return _mapping_like(node, edit(prefix, items))
        children, treedef = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node
        )
        return treedef.unflatten([walk(child, (*prefix, *kp)) for kp, child in children])

    return walk(tree, ())


def strip_extra_leaves(params: Params) -> Params:
    """`params` without the extra leaves of training-time methods: mapping entries whose key
    contains '@' (movement scores, LSQ steps, binary-split halves), at any depth."""
    return edit_mappings(
        params, lambda _, items: {k: v for k, v in items.items() if EXTRA_MARK not in str(k)}
    )


def compose(*transforms: StructureTransform) -> StructureTransform:
    """Structure transforms applied left to right.

    Args:
      *transforms: `(config, params) -> (config, params)` functions; none: the identity.

    Returns:
      One structure transform that runs `transforms` in order, each on the previous one's
      `(config, params)`.
    """

    def composed(config, params):
        for transform in transforms:
            config, params = transform(config, params)
        return config, params

    return composed


class Reparam(NamedTuple):
    """A training-time reparameterization, optax-style: a tuple of pure, jit-able functions.

    Attributes:
      init: `params -> state`.
      apply: `(params, state) -> params` the forward pass sees; it consumes the method's
        extra leaves (movement scores, LSQ steps) and returns the model's own tree.
      update: `(params, state, step) -> state` after optimizer step `step` (1-based):
        non-gradient state such as masks, on a schedule.
      finalize: `(params, state) -> params` to export (pruned weights zero, quantized weights
        as their codes' values); None: `apply`.
      stored_mask: `(params, state) -> bool tree like params` (scalar True where nothing is
        masked), or None. The entries it marks False are projected into the stored weights:
        `with_reparam` holds them at exactly zero with zero updates and zero optimizer
        moments (pruning masks). None: the stored weights are latent and stay as trained
        (fake quantization keeps float weights).
      frozen_mask: like `stored_mask`, but the entries it marks False only stop moving (zero
        updates, zero optimizer moments) and keep their stored value: movement pruning,
        where a pruned weight comes back as it was if its score rises again.
    """

    init: Callable[[Params], State]
    apply: Callable[[Params, State], Params]
    update: Callable[[Params, State, jax.Array], State]
    finalize: Callable[[Params, State], Params] | None = None
    stored_mask: Callable[[Params, State], Params] | None = None
    frozen_mask: Callable[[Params, State], Params] | None = None


def identity() -> Reparam:
    """The reparameterization that changes nothing.

    Returns:
      A `Reparam` with an empty state, whose `apply` returns the params unchanged.
    """
    return Reparam(
        init=lambda params: (),
        apply=lambda params, state: params,
        update=lambda params, state, step: state,
    )


def chain(*reparams: Reparam) -> Reparam:
    """Reparameterizations applied in order; `update`, `finalize` and `stored_mask` see the
    params as each one receives them (after the previous ones' `apply`).

    Args:
      *reparams: the reparameterizations, first applied first.

    Returns:
      A `Reparam` whose state is the tuple of the members' states; its `stored_mask` and
      `frozen_mask` are the AND of the members' masks of that kind (None if no member has
      one).
    """

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

    def finalize(params, state):
        for r, s in zip(reparams, state, strict=True):
            params = (r.finalize or r.apply)(params, s)
        return params

    def combined(kind: str) -> Callable[[Params, State], Params] | None:
        # The AND of the members' masks of one kind, each computed on the params as that
        # member receives them.
        masked = [i for i, r in enumerate(reparams) if getattr(r, kind) is not None]
        if not masked:
            return None

        def mask(params, state):
            masks: dict[str, jax.Array] = {}
            seen = params
            for r, s in zip(reparams[: masked[-1] + 1], state, strict=False):
                if getattr(r, kind) is not None:
                    for path, m in leaves_by_path(getattr(r, kind)(seen, s)).items():
                        masks[path] = m if path not in masks else jnp.logical_and(masks[path], m)
                seen = r.apply(seen, s)
            return like(params, masks, lambda _: jnp.array(True))

        return mask

    return Reparam(init, apply, update, finalize, combined("stored_mask"), combined("frozen_mask"))


def skipping(reparam: Reparam, keys: Sequence[Any]) -> Reparam:
    """`reparam` on a mapping without its top-level entries `keys` (a distillation
    objective's projections, exit heads), which pass through every function unchanged.

    Args:
      reparam: the reparameterization of the rest of the mapping.
      keys: the top-level keys left alone (absent ones are ignored).

    Returns:
      A `Reparam` over the whole mapping, with the same state as `reparam`.
    """
    keys = tuple(keys)

    def split(params):
        own = {k: v for k, v in params.items() if k not in keys}
        return own, {k: v for k, v in params.items() if k in keys}

    def on_own(fn):
        def run(params, state):
            own, rest = split(params)
            return {**fn(own, state), **rest}

        return run

    def mask_of(fn):
        def run(params, state):
            own, rest = split(params)
            return {**fn(own, state), **jax.tree.map(lambda _: jnp.array(True), rest)}

        return None if fn is None else run

    return Reparam(
        init=lambda params: reparam.init(split(params)[0]),
        apply=on_own(reparam.apply),
        update=lambda params, state, step: reparam.update(split(params)[0], state, step),
        finalize=None if reparam.finalize is None else on_own(reparam.finalize),
        stored_mask=mask_of(reparam.stored_mask),
        frozen_mask=mask_of(reparam.frozen_mask),
    )


def export(reparam: Reparam, params: Params, state: State) -> Params:
    """What to export of trained `params`: `reparam.finalize` (or `apply`), extra leaves
    (keys holding '@') removed."""
    return strip_extra_leaves((reparam.finalize or reparam.apply)(params, state))


# ---------------------------------------------------------------------------------------------
# The optax wrapper: a reparam's state inside the optimizer state


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["inner", "state", "step"],
    meta_fields=["reparam"],
)
@dataclasses.dataclass(frozen=True)
class ReparamState:
    """The optimizer state of `with_reparam`; `reparam` rides along as static data, so that
    `reparam_apply` and `finalize` need nothing but the optimizer state."""

    inner: Any  # the wrapped optimizer's state
    state: State  # the reparam's state (masks, ...)
    step: jax.Array  # int32: optimizer steps taken
    reparam: Reparam


def _where(mask: Params, x: Params, other: Callable[[jax.Array], jax.Array]) -> Params:
    return jax.tree.map(lambda m, v: jnp.where(m, v, other(v)), mask, x)


def with_reparam(
    reparam: Reparam, tx: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """`tx` with `reparam`'s state (and a step counter) kept inside its optimizer state.

    Take gradients through `reparam_apply(params, opt_state)`, then call `update` as for
    any optax transform: it updates `tx`, advances the reparam on its schedule (its
    `update(new_params, state, step)`) and, where the reparam has a `stored_mask`, returns
    updates after which the masked weights are exactly zero in the stored params, with
    zero optimizer moments (a `frozen_mask`: they keep their value and do not move).
    `finalize(params, opt_state)` gives what to export.

    Example::

        tx = with_reparam(magnitude_pruning(rules, Schedule(0.5, end_step=100)), optax.adam(1e-3))
        opt_state = tx.init(params)
        grads = jax.grad(lambda p: loss(reparam_apply(p, opt_state)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

    Args:
      reparam: the training-time reparameterization (a `chain` for several).
      tx: the optimizer.

    Returns:
      An optax transform whose `update` needs `params` and passes extra arguments to `tx`.
    """
    inner = optax.with_extra_args_support(tx)

    def init(params: Params) -> ReparamState:
        return ReparamState(
            inner.init(params), reparam.init(params), jnp.zeros((), jnp.int32), reparam
        )

    def update(updates, state: ReparamState, params=None, **extra):
        if params is None:
            raise ValueError("with_reparam: update(updates, opt_state, params) needs params")
        mask, frozen = reparam.stored_mask, reparam.frozen_mask
        zeros = []  # masks whose False entries get zero updates out and zero moments
        if mask is not None:
            old = mask(params, state.state)
            updates = _where(old, updates, jnp.zeros_like)
        if frozen is not None:
            hold = frozen(params, state.state)
            updates = _where(hold, updates, jnp.zeros_like)
            zeros.append(hold)
        updates, inner_state = inner.update(updates, state.inner, params, **extra)
        step = state.step + 1
        for hold in zeros:
            updates = _where(hold, updates, jnp.zeros_like)
        new_state = reparam.update(optax.apply_updates(params, updates), state.state, step)
        if mask is not None:
            keep = jax.tree.map(
                jnp.logical_and, old, mask(optax.apply_updates(params, updates), new_state)
            )
            # -p, not 0: the stored weight becomes exactly zero, even where it was not yet.
            updates = jax.tree.map(
                lambda m, u, p: jnp.where(m, u, -p.astype(u.dtype)), keep, updates, params
            )
            zeros.append(keep)
        for keep in zeros:
            # A masked inner transform (`optax.masked`) holds no moments where it is masked.
            inner_state = optax.tree_utils.tree_map_params(
                inner,
                lambda x, m: x if _is_masked(x) else jnp.where(m, x, jnp.zeros_like(x)),
                inner_state,
                keep,
                transform_non_params=lambda x: x,
                is_leaf=_is_masked,
            )
        return updates, ReparamState(inner_state, new_state, step, reparam)

    return optax.GradientTransformationExtraArgs(init, update)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def reparam_state(opt_state: Any) -> ReparamState:
    """The one `ReparamState` inside an optimizer state (bare, in a `chain`, under
    `inject_hyperparams`, ...). Raises ValueError if there is none, or several."""
    found = [
        x
        for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ReparamState))
        if isinstance(x, ReparamState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected one with_reparam state inside the optimizer state, found {len(found)}; "
            "wrap the optimizer once, with core.chain(...) for several reparams"
        )
    return found[0]


def reparam_apply(params: Params, opt_state: Any) -> Params:
    """The params the forward pass sees: the reparam of `with_reparam` (found inside
    `opt_state`) applied to the stored `params`.

    Args:
      params: the stored (trained) params, extra leaves included.
      opt_state: an optimizer state holding exactly one `with_reparam` state (bare, in an
        `optax.chain`, under `inject_hyperparams`, ...).

    Returns:
      The reparam's `apply(params, state)`: the model's own tree, as the forward pass sees it.

    Raises:
      ValueError: `opt_state` holds no `with_reparam` state, or several.
    """
    found = reparam_state(opt_state)
    return found.reparam.apply(params, found.state)


def finalize(params: Params, opt_state: Any) -> Params:
    """What to export of params trained under `with_reparam`: the reparam's `finalize`
    (pruned weights zero, quantized weights as their codes' values), extra leaves removed.

    Args:
      params: the stored (trained) params, extra leaves included.
      opt_state: an optimizer state holding exactly one `with_reparam` state.

    Returns:
      The reparam's `finalize(params, state)` (its `apply` if it has none), without the
      mapping entries whose key contains '@' (movement scores, LSQ steps, ...).

    Raises:
      ValueError: `opt_state` holds no `with_reparam` state, or several.
    """
    found = reparam_state(opt_state)
    return export(found.reparam, params, found.state)
