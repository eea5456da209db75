"""Parameter sharing: tying named groups on any tree, and ALBERT's cross-layer sharing of BERT."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress import core
from jaxcompress.models.bert import BertConfig, unshare_layers
from jaxcompress.models.bert_rules import LAYER_PREFIX as _LAYER

unshare = unshare_layers  # re-exported: sharing and unsharing belong together for users
TIE_INITS = ("mean", "first", "last")


def _members(group: str | Sequence[str], nodes: list[str]) -> list[str]:
    """The node paths a group names: a regex (outermost fullmatches) or a list of paths."""
    if isinstance(group, str):
        regex = re.compile(group)
        hits = [n for n in nodes if regex.fullmatch(n)]
        members = [n for n in hits if not any(n.startswith(h + "/") for h in hits)]
    else:
        members = list(group)
        if missing := [m for m in members if m not in nodes]:
            raise ValueError(f"tie group {list(group)}: no parameter or module at {missing[0]!r}")
    if len(members) < 2:
        raise ValueError(f"tie group {group!r} names {members}; a group needs two or more members")
    return members


def tie(
    params: core.Params, groups: Sequence[str | Sequence[str]], init: str = "mean"
) -> tuple[core.Params, dict[str, str]]:
    r"""Ties each group's members to one shared value, on any parameter tree.

    A member is a leaf or a subtree (a module) named by its '/'-joined path; members of a
    group must hold the same leaf paths below them, with equal shapes and dtypes, and each
    of those leaves is tied across the members. The shared value lives at the first member's
    path; the other members' leaves become None. Train the tied tree and run the model on
    `expand(tied, shared)`: the gradient of a shared value is the sum over its members.

    Args:
      params: any parameter tree (dicts, FrozenDict, lists, tuples, nnx.State).
      groups: each group a regex (its outermost fullmatching leaf or module paths, in tree
        order) or a list of paths, e.g. `r"layers/\d+"` or `["enc/0/ffn", "enc/1/ffn"]`.
      init: the shared value: the members' "mean", or the "first" or "last" member's value.

    Returns:
      The tied tree (the input's structure, None at the tied-away leaves) and `shared`:
      every tied-away leaf path -> the path of the shared value it reads.
    """
    if init not in TIE_INITS:
        raise ValueError(f"tie: init must be one of {TIE_INITS}, got {init!r}")
    paths = core.leaf_paths(params)
    leaves = dict(zip(paths, jax.tree_util.tree_leaves(params), strict=True))
    nodes = list(dict.fromkeys(p.rsplit("/", k)[0] for p in paths for k in range(p.count("/") + 1)))
    owners: dict[str, jax.Array] = {}
    shared: dict[str, str] = {}
    for group in groups:
        members = _members(group, nodes)

        def below(member: str) -> list[str]:
            return [p[len(member) :] for p in paths if p == member or p.startswith(member + "/")]

        rest = below(members[0])
        for member in members[1:]:
            if below(member) != rest:
                raise ValueError(
                    f"tie group {group!r}: {member} holds other parameters than {members[0]}"
                )
        for tail in rest:
            full = [m + tail for m in members]
            if taken := [p for p in full if p in shared or p in owners]:
                raise ValueError(f"tie group {group!r}: {taken[0]} is already in another group")
            values = [leaves[p] for p in full]
            if len({(jnp.shape(v), jnp.result_type(v)) for v in values}) > 1:
                shapes = [jnp.shape(v) for v in values]
                raise ValueError(f"tie group {group!r}: {tail or 'the members'} differ: {shapes}")
            if init == "mean":
                owners[full[0]] = jnp.mean(jnp.stack(values), 0).astype(jnp.result_type(values[0]))
            else:
                owners[full[0]] = values[0 if init == "first" else -1]
            shared |= {p: full[0] for p in full[1:]}

    def visit(key_path, leaf):
        path = core.path_str(key_path)
        return None if path in shared else owners.get(path, leaf)

    return jax.tree_util.tree_map_with_path(visit, params), shared


def expand(tied: core.Params, shared: dict[str, str]) -> core.Params:
    """The full tree of a tied one: every tied-away leaf reads its shared value.

    Args:
      tied: the tied tree of `tie` (or its trained successor, in the same structure).
      shared: the mapping `tie` returned.

    Returns:
      A tree in the structure `tie` was given, for the forward pass of any model; under
      `jax.grad` each shared value collects the gradients of all its members.
    """
    flat = {core.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tied)[0]}
    if missing := sorted(set(shared.values()) - set(flat)):
        raise ValueError(f"expand: the tied tree has no shared value at {missing[0]}")

    def visit(key_path, leaf):
        path = core.path_str(key_path)
        return flat[shared[path]] if path in shared else leaf

    return jax.tree_util.tree_map_with_path(visit, tied, is_leaf=lambda x: x is None)


def tying(shared: dict[str, str]) -> core.Reparam:
    """Tying as a stateless `core.Reparam`: train the tied tree of `tie`; `apply` gives the
    forward pass the full tree (`expand`), so the shared values' gradients sum over members.

    Args:
      shared: the mapping `tie` returned.

    Returns:
      The reparameterization.
    """
    return core.Reparam(
        init=lambda params: (),
        apply=lambda params, state: expand(params, shared),
        update=lambda params, state, step: state,
    )


def all_layers(num_layers: int) -> tuple[int, ...]:
    """Every layer in one group."""
    return (0,) * num_layers


def every_k(num_layers: int, k: int) -> tuple[int, ...]:
    """Each run of k consecutive layers shares one group (the last run may be shorter)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return tuple(i // k for i in range(num_layers))


def group_map(groups: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The layer -> group map that `groups` names.

    Args:
      groups: 'all' (one group), 'every:K' (K >= 1 consecutive layers per group) or an
        explicit layer -> group list, returned as it is.
      num_layers: the number of layers.

    Returns:
      One group index per layer.

    Raises:
      ValueError: `groups` is none of these forms.
    """
    if groups == "all":
        return all_layers(num_layers)
    if isinstance(groups, str) and groups.startswith("every:"):
        k = groups[len("every:") :]
        if k.isdigit() and int(k) >= 1:
            return every_k(num_layers, int(k))
    elif isinstance(groups, tuple | list):
        return tuple(groups)
    raise ValueError(
        f"groups must be 'all' or 'every:K' with K >= 1, or a layer -> group list; got {groups!r}"
    )


def _normalise(groups: Sequence[int] | None, num_layers: int, name: str) -> tuple[int, ...] | None:
    """Renumber groups 0..k-1 by first use, so group g lives under encoder/layer/g."""
    if groups is None:
        return None
    if len(groups) != num_layers:
        raise ValueError(f"{name} has {len(groups)} entries for {num_layers} layers")
    first_use: dict[int, int] = {}
    for g in groups:
        first_use.setdefault(g, len(first_use))
    return tuple(first_use[g] for g in groups)


def share_layers(
    config: BertConfig,
    params: dict,
    *,
    attention_groups: Sequence[int] | None = None,
    ffn_groups: Sequence[int] | None = None,
    init: str | int = "mean",
) -> tuple[BertConfig, dict]:
    """Tie layers' parameters by group maps (layer -> group); `None` leaves that half unshared.

    Whole-layer sharing passes the same map for both. A shared set is initialised from the
    member layers by `init`: "mean" (average), "first" or "last" member, or a layer index
    (the same layer for every group; it must belong to each group). Gradients of a shared set
    accumulate over every layer that uses it, because the model calls one module for all.
    """
    n = config.num_hidden_layers
    config, params = unshare(config, params)
    attention_groups = _normalise(attention_groups, n, "attention_groups")
    ffn_groups = _normalise(ffn_groups, n, "ffn_groups")
    flat = flatten_dict(params, sep="/")
    out = {k: v for k, v in flat.items() if not k.startswith(_LAYER)}
    for given, attention in ((attention_groups, True), (ffn_groups, False)):
        groups = given or tuple(range(n))
        for group in sorted(set(groups)):
            members = [layer for layer in range(n) if groups[layer] == group]
            sources = members if given is None else _init_sources(members, init)
            prefix = f"{_LAYER}{members[0]}/"
            for path in flat:
                rest = path[len(prefix) :]
                if not path.startswith(prefix) or rest.startswith("attention/") != attention:
                    continue
                stacked = jnp.stack([flat[f"{_LAYER}{m}/{rest}"] for m in sources])
                out[f"{_LAYER}{group}/{rest}"] = stacked.mean(0).astype(flat[path].dtype)
    shared = config.replace(attention_groups=attention_groups, ffn_groups=ffn_groups)
    return shared, unflatten_dict(out, sep="/")


def _init_sources(members: list[int], init: str | int) -> list[int]:
    if init == "mean":
        return members
    if init == "first":
        return members[:1]
    if init == "last":
        return members[-1:]
    if isinstance(init, int):
        if init not in members:
            raise ValueError(f"init layer {init} is not in the group {members}")
        return [init]
    raise ValueError(f"init must be 'mean', 'first', 'last' or a layer index, got {init!r}")
