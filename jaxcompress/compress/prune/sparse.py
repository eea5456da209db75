"""Unstructured-sparse artefacts: a bitmask and the kept values per pruned weight, in safetensors.

A weight the rules select is stored as `path:bitmask` (one bit per entry, np.packbits
order) and `path:values` (its nonzeros in row-major order, in the weight's dtype); other
leaves are stored as they are. At sparsity s a float32 weight costs 1/32 + (1 - s) of its
dense bytes. Loading rebuilds the exact dense tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax.traverse_util import unflatten_dict

from jaxcompress import core
from jaxcompress.compress.quant.pack import Packed, file_bytes, read_packed, write_packed

META_KEY = "jaxcompress.sparse"
FORMAT = 1
BITMASK, VALUES = ":bitmask", ":values"


def pack(params: core.Params, rules: core.Rules) -> Packed:
    """Bitmask and nonzero values of every weight `rules` select; other leaves as they are."""
    selected = core.match_rules(params, rules, name="sparse")
    tensors: dict[str, np.ndarray] = {}
    meta: dict = {"format": FORMAT, "sparse": {}, "float": []}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path, x = core.path_str(key_path), np.asarray(leaf)
        if path not in selected:
            tensors[path] = x
            meta["float"].append(path)
            continue
        nonzero = x.reshape(-1) != 0
        tensors[path + BITMASK] = np.packbits(nonzero)
        tensors[path + VALUES] = x.reshape(-1)[nonzero]
        meta["sparse"][path] = {"shape": list(x.shape), "dtype": str(x.dtype)}
    return Packed(tensors, meta)


def unpack(packed: Packed, like: core.Params | None = None) -> core.Params:
    """The dense params of a packed tree: nested dicts keyed by the path components, or the
    structure of `like` (any pytree with the saved leaf paths, e.g. the params that were
    saved: lists, int keys, FrozenDict and nnx.State come back as they were)."""
    tensors, meta = packed
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown sparse artefact format {meta.get('format')!r}")
    flat = {path: tensors[path] for path in meta["float"]}
    for path, info in meta["sparse"].items():
        size = int(np.prod(info["shape"]))
        nonzero = np.unpackbits(tensors[path + BITMASK], count=size).astype(bool)
        dense = np.zeros(size, info["dtype"])
        dense[nonzero] = tensors[path + VALUES]
        flat[path] = dense.reshape(info["shape"])
    if like is None:
        return unflatten_dict(flat, sep="/")
    paths = core.leaf_paths(like)
    if set(paths) != set(flat):
        extra, missing = sorted(set(flat) - set(paths)), sorted(set(paths) - set(flat))
        raise ValueError(
            f"sparse artefact does not fit `like`: saved but not in like {extra[:3]}, "
            f"in like but not saved {missing[:3]}"
        )
    return core.map_with_path(lambda path, _: flat[path], like)


def save(path: str | os.PathLike, params: core.Params, rules: core.Rules) -> Path:
    """Write the sparse artefact to one safetensors file: a bitmask and the kept values of
    each selected weight, every other leaf dense.

    Args:
      path: the file to write (its folder is created).
      params: any pytree whose pruned weights are exactly zero.
      rules: `(regex, True or None)` choosing the weights stored sparse.

    Returns:
      The path written.
    """
    return write_packed(path, pack(params, rules), META_KEY)


def load(path: str | os.PathLike, like: core.Params | None = None) -> core.Params:
    """The dense params of a file written by `save`.

    Args:
      path: a file written by `save`.
      like: a template tree to fill instead of the saved structure (same leaf paths).

    Returns:
      The params, pruned weights zero, in the saved structure (or `like`'s).
    """
    return unpack(read_packed(path, META_KEY, kind="sparse"), like)


def sparse_bytes(params: core.Params, rules: core.Rules) -> dict[str, int]:
    """Bytes of the sparse file, with and without the embedding tables, measured by writing.

    Args:
      params: as for `save`.
      rules: as for `save`.

    Returns:
      `{"bytes": ..., "bytes_no_embeddings": ...}`.
    """
    return file_bytes(*pack(params, rules), entries="sparse", meta_key=META_KEY)
