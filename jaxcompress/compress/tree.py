"""Adding and removing entries of the mappings inside any parameter tree, at any depth."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxcompress import core
from jaxcompress.core import KeyPath, edit_mappings, is_entry


def entry_path(prefix: KeyPath, key: Any, entry: Any) -> str | None:
    """The '/'-joined path (as `core.path_str` writes it) of the weight a mapping entry holds,
    or None when the entry is a subtree."""
    if not is_entry(entry):
        return None
    inner = jax.tree_util.tree_flatten_with_path(entry)[0]
    inner_path = inner[0][0] if inner else ()
    return core.path_str((*prefix, jax.tree_util.DictKey(key), *inner_path))


def value(entry: Any) -> Any:
    """The array an entry holds (unwrapped from its `nnx.Variable`)."""
    return entry.get_value() if isinstance(entry, nnx.Variable) else entry


def like(entry: Any, array: Any) -> Any:
    """`array` wrapped as `entry` is (an `nnx.Variable` of the same type and metadata)."""
    return entry.replace(array) if isinstance(entry, nnx.Variable) else array


def add_beside(tree: core.Params, side: dict[str, Any], suffix: str) -> core.Params:
    """`tree` plus `side[path]` as the entry `key + suffix` beside the weight at each `path`.

    Raises:
      ValueError: a weight sits in a list or tuple or under a non-string key (no key to add).
    """
    placed: set[str] = set()

    def edit(prefix: KeyPath, items: dict) -> dict:
        out = {}
        for key, entry in items.items():
            out[key] = entry
            path = entry_path(prefix, key, entry)
            if path in side and isinstance(key, str):
                out[key + suffix] = like(entry, side[path])
                placed.add(path)
        return out

    result = edit_mappings(tree, edit)
    if missing := sorted(set(side) - placed):
        raise ValueError(
            f"{missing[0]}: cannot add '{suffix}' beside it: the weight sits in a list or tuple "
            "or under a non-string key; hold it in a mapping with string keys"
        )
    return result


def strip_suffix(tree: core.Params, suffix: str) -> tuple[core.Params, dict[str, Any]]:
    """`tree` without the entries whose key ends in `suffix`, and those entries' arrays by
    the path of the weight they belong to (the key without the suffix)."""
    side: dict[str, Any] = {}

    def edit(prefix: KeyPath, items: dict) -> dict:
        out = {}
        for key, entry in items.items():
            if isinstance(key, str) and key.endswith(suffix) and is_entry(entry):
                side[entry_path(prefix, key.removesuffix(suffix), entry)] = value(entry)
            else:
                out[key] = entry
        return out

    return edit_mappings(tree, edit), side
