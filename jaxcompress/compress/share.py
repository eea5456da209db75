"""Cross-layer parameter sharing (ALBERT): all layers, attention-only, FFN-only, or groups."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.models.bert import BertConfig, unshare_layers

unshare = unshare_layers  # re-exported: sharing and unsharing belong together for users

_LAYER = "bert/encoder/layer/"


def all_layers(num_layers: int) -> tuple[int, ...]:
    """Every layer in one group."""
    return (0,) * num_layers


def every_k(num_layers: int, k: int) -> tuple[int, ...]:
    """Each run of k consecutive layers shares one group (the last run may be shorter)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return tuple(i // k for i in range(num_layers))


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
