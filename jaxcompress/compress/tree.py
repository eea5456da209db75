"""Adding and removing entries of the mappings inside any parameter tree, at any depth."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from flax.core import FrozenDict

from jaxcompress import core

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


def edit_mappings(tree: core.Params, edit: Edit) -> core.Params:
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
