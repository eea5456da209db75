"""Packed quantized artefacts: codes at 1, 2, 4 or 8 bits (fp8: e4m3 bytes), scales, safetensors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict
from flax.traverse_util import unflatten_dict
from jax.tree_util import DictKey, SequenceKey
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxcompress import core
from jaxcompress.compress.quant.qat import SPLIT_SUFFIX, quantize_tree
from jaxcompress.compress.quant.quantizers import QTensor, QuantSpec, dequantize
from jaxcompress.core import is_entry

META_KEY = "jaxcompress.quant"  # the JSON description, in the safetensors header metadata
FORMAT = 1
CODES, SCALE, ZERO_POINT = ":codes", ":scale", ":zero_point"
# What `file_bytes` counts as embeddings by default: `nn.Embed`'s 'embedding', any
# '*_embeddings' table and an 'embedding_projection' (ALBERT's factorized embedding).
EMBEDDING_LEAVES = r"(.*/)?([^/]*_)?(embedding|embeddings|embedding_projection)(/value)?"


class Packed(NamedTuple):
    """What goes into the file: named numpy arrays and the JSON-able description."""

    tensors: dict[str, np.ndarray]
    meta: dict


def container_bits(spec: QuantSpec) -> int:
    """Bits each code occupies in the file: 1 (binary), 2 (ternary, 2-bit), 4 (3-4) or 8."""
    return next(width for width in (1, 2, 4, 8) if spec.bits <= width)


def to_unsigned(codes: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Codes shifted to 0..2^bits - 1 (binary -1/1 to 0/1), as uint8; fp8 codes as their
    e4m3 bit patterns."""
    if spec.scheme == "fp8":
        return np.asarray(codes).astype(spec.code_dtype).view(np.uint8)
    codes = np.asarray(codes, np.int32)
    u = (codes + 1) // 2 if spec.scheme == "binary" else codes - spec.qmin
    return u.astype(np.uint8)


def from_unsigned(u: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The inverse of `to_unsigned`: int32 codes, or float8_e4m3fn codes for fp8."""
    if spec.scheme == "fp8":
        return np.asarray(u, np.uint8).view(spec.code_dtype)
    u = np.asarray(u, np.int32)
    return 2 * u - 1 if spec.scheme == "binary" else u + spec.qmin


def pack_bits(u: np.ndarray, width: int) -> np.ndarray:
    """Values of `width` bits (1, 2, 4 or 8), 8 // width to a byte, first value lowest."""
    flat = np.asarray(u, np.uint8).reshape(-1)
    if width == 8:
        return flat.copy()
    if width == 1:
        return np.packbits(flat, bitorder="little")
    per = 8 // width
    padded = np.zeros(-(-flat.size // per) * per, np.uint8)
    padded[: flat.size] = flat
    shifts = (np.arange(per, dtype=np.uint8) * width)[None, :]
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """The first `count` values of `width` bits packed by `pack_bits`."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if width == 8:
        return packed[:count].copy()
    if width == 1:
        return np.unpackbits(packed, count=count, bitorder="little")
    per, mask = 8 // width, (1 << width) - 1
    shifts = (np.arange(per, dtype=np.uint8) * width)[None, :]
    return ((packed[:, None] >> shifts) & mask).reshape(-1)[:count].astype(np.uint8)


def describe_tree(tree: core.Params) -> Any:
    """A JSON-able description of `tree`'s containers, or None when it is nested dicts with
    string keys, which `build_tree` rebuilds from the '/'-joined leaf paths alone.

    Dicts, FrozenDicts, lists, tuples, int keys and None are described; an `nnx.State` is
    described as its pure dict (`nnx.to_pure_dict`), other nodes as dicts of their children.
    Leaves are described by their path.

    Args:
      tree: any parameter tree.

    Returns:
      Nested `{"dict" | "frozen": [[key, child], ...]}`, `{"list" | "tuple": [child, ...]}`,
      path strings and None; or None for a plain tree.
    """
    paths = core.leaf_paths(tree)
    plain = unflatten_dict({tuple(p.split("/")): 0 for p in paths})
    if type(tree) is dict and jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(
        tree
    ):
        return None

    def walk(node: Any, prefix: tuple) -> Any:
        if node is None:
            return None
        if is_entry(node):
            inner = jax.tree_util.tree_flatten_with_path(node)[0]
            return core.path_str((*prefix, *(inner[0][0] if inner else ())))
        if isinstance(node, Mapping):
            items = node.raw_mapping if isinstance(node, nnx.State) else node
            kind = "frozen" if isinstance(node, FrozenDict) else "dict"
            return {
                kind: [
                    [k if isinstance(k, str | int) else str(k), walk(v, (*prefix, DictKey(k)))]
                    for k, v in items.items()
                ]
            }
        if isinstance(node, list | tuple):
            kind = "list" if isinstance(node, list) else "tuple"
            return {kind: [walk(v, (*prefix, SequenceKey(i))) for i, v in enumerate(node)]}
        children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
        return {"dict": [[core.key_str(kp[-1]), walk(c, (*prefix, *kp))] for kp, c in children]}

    return walk(tree, ())


def build_tree(flat: Mapping[str, Any], description: Any = None, like: Any = None) -> Any:
    """The tree whose leaves are `flat` (by '/'-joined path), shaped by `like` or else by a
    `describe_tree` description (None: nested dicts split at '/').

    Args:
      flat: the arrays by leaf path.
      description: what `describe_tree` returned for the saved tree.
      like: a tree (or `jax.eval_shape` output) of the wanted structure, e.g. the
        `nnx.State` or FrozenDict that was saved; its leaf paths must be exactly `flat`'s.

    Returns:
      The tree, in `like`'s structure when given.

    Raises:
      ValueError: `like` has other leaf paths or shapes than `flat`.
    """
    if like is not None:
        paths = core.leaf_paths(like)
        if missing := sorted(set(paths) - set(flat)):
            raise ValueError(
                f"like: the artefact has no leaf {missing[0]} ({len(missing)} missing)"
            )
        if extra := sorted(set(flat) - set(paths)):
            raise ValueError(f"like: the template has no leaf {extra[0]} ({len(extra)} more)")
        leaves = jax.tree_util.tree_leaves(like)
        for path, leaf in zip(paths, leaves, strict=True):
            if hasattr(leaf, "shape") and tuple(leaf.shape) != tuple(np.shape(flat[path])):
                raise ValueError(
                    f"like: {path} is {tuple(leaf.shape)} in the template but "
                    f"{tuple(np.shape(flat[path]))} in the artefact"
                )
        return jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(like), [flat[p] for p in paths]
        )
    if description is None:
        return unflatten_dict(dict(flat), sep="/")

    def build(node: Any) -> Any:
        if node is None:
            return None
        if isinstance(node, str):
            return flat[node]
        ((kind, children),) = node.items()
        if kind in ("dict", "frozen"):
            out = {k: build(v) for k, v in children}
            return FrozenDict(out) if kind == "frozen" else out
        values = [build(v) for v in children]
        return values if kind == "list" else tuple(values)

    return build(description)


def pack(params: core.Params, rules: core.Rules) -> Packed:
    """Codes, scales and zero points of the weights `rules` select; other leaves as they are.

    LSQ steps in `params` (see `qat.add_lsq_steps`) become the stored scales; a weight split
    in two binary halves (`qat.add_binary_split`) stores both halves' codes.

    Args:
      params: any parameter tree; its structure is described in the metadata (`describe_tree`)
        unless it is plain nested dicts.
      rules: `(regex, QuantSpec or None)` on the '/'-joined leaf paths.

    Returns:
      The named arrays (by leaf path, quantized ones as 'path:codes', 'path:scale',
      'path:zero_point') and the JSON description.
    """
    model, quantized = quantize_tree(params, rules)
    leaves = _flat(model)
    tensors: dict[str, np.ndarray] = {}
    meta: dict = {"format": FORMAT, "quantized": {}, "float": []}
    if (tree := describe_tree(model)) is not None:
        meta["tree"] = tree
    for path, leaf in leaves:
        if path not in quantized:
            tensors[path] = np.asarray(leaf)
            meta["float"].append(path)
            continue
        spec = quantized[path][1]
        width = container_bits(spec)
        halves = [path, path + SPLIT_SUFFIX] if path + SPLIT_SUFFIX in quantized else [path]
        for name in halves:
            qt = quantized[name][0]
            tensors[name + CODES] = pack_bits(to_unsigned(qt.codes, spec), width)
            tensors[name + SCALE] = np.asarray(qt.scale, np.float32)
            if qt.zero_point is not None:
                tensors[name + ZERO_POINT] = np.asarray(qt.zero_point, np.uint8)
        meta["quantized"][path] = {
            "shape": list(np.shape(leaf)),
            "dtype": str(np.asarray(leaf).dtype),
            "width": width,
            "spec": dataclasses.asdict(spec),
        }
        if len(halves) > 1:
            meta["quantized"][path]["halves"] = len(halves)
    return Packed(tensors, meta)


def _flat(tree: core.Params) -> list[tuple[str, object]]:
    flat = [(core.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if len({path for path, _ in flat}) != len(flat):
        seen: set[str] = set()
        twice = next(path for path, _ in flat if path in seen or seen.add(path))
        raise ValueError(f"{twice}: two leaves share this path (e.g. keys 0 and '0'); rename one")
    return flat


def unpack(
    packed: Packed, like: Any = None
) -> tuple[core.Params, dict[str, tuple[QTensor, QuantSpec]]]:
    """The dequantized float params (bit-exact with `qat(rules).apply`) and the codes.

    Args:
      packed: what `pack` or `read` returned.
      like: optional template of the params' structure (see `build_tree`); without it the
        saved structure comes back, an `nnx.State` as its pure dict.

    Returns:
      The params, and the codes and spec of every quantized weight by path.
    """
    tensors, meta = packed
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown quantized artefact format {meta.get('format')!r}")
    flat = {path: jnp.asarray(tensors[path]) for path in meta["float"]}
    codes = {}
    for path, info in meta["quantized"].items():
        spec = QuantSpec(**info["spec"])
        shape = tuple(info["shape"])
        names = [path, path + SPLIT_SUFFIX][: info.get("halves", 1)]
        value = 0.0
        for name in names:
            u = unpack_bits(tensors[name + CODES], info["width"], int(np.prod(shape)))
            zp = tensors.get(name + ZERO_POINT)
            qt = QTensor(
                jnp.asarray(from_unsigned(u, spec).reshape(shape)),
                jnp.asarray(tensors[name + SCALE], jnp.float32),
                None if zp is None else jnp.asarray(zp, jnp.float32),
            )
            codes[name] = (qt, spec)
            value = value + dequantize(qt, spec)
        flat[path] = value.astype(info["dtype"])
    return build_tree(flat, meta.get("tree"), like), codes


def write_packed(path: str | os.PathLike, packed: Packed, meta_key: str = META_KEY) -> Path:
    """Write packed arrays to one safetensors file, the description under `meta_key`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(packed.tensors, target, metadata={meta_key: json.dumps(packed.meta)})
    return target


def read_packed(
    path: str | os.PathLike, meta_key: str = META_KEY, kind: str = "packed quantized"
) -> Packed:
    """The arrays and description of a file written by `write_packed` with `meta_key`."""
    with safe_open(Path(path), framework="np") as f:
        metadata = f.metadata() or {}
        if meta_key not in metadata:
            raise ValueError(f"{path} is not a {kind} artefact (no {meta_key} metadata)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return Packed(tensors, json.loads(metadata[meta_key]))


def save(path: str | os.PathLike, params: core.Params, rules: core.Rules) -> Path:
    """Write one safetensors file: packed codes, scales, float leaves, and the JSON meta.

    Args:
      path: the file to write (its folder is created).
      params: any pytree; LSQ steps and binary-split halves beside their weights are used.
      rules: `(regex, QuantSpec or None)` choosing the quantized leaves; others stay float.

    Returns:
      The path written.
    """
    return write_packed(path, pack(params, rules))


def read(path: str | os.PathLike) -> Packed:
    """The arrays and description of a file written by `save`."""
    return read_packed(path)


def load(path: str | os.PathLike, like: Any = None) -> core.Params:
    """The dequantized float params of a file written by `save`.

    Args:
      path: a file written by `save`.
      like: a template tree to fill instead of the saved structure (same leaf paths).

    Returns:
      The params, in the saved structure (or `like`'s).
    """
    return unpack(read(path), like)[0]


def packed_bytes(
    params: core.Params, rules: core.Rules, embeddings: str = EMBEDDING_LEAVES
) -> dict[str, int]:
    """Bytes of the packed file, with and without the embedding tables, measured by writing.

    Args:
      params: as for `save`.
      rules: as for `save`.
      embeddings: the regex of the embedding leaves' paths.

    Returns:
      `{"bytes": ..., "bytes_no_embeddings": ...}`.
    """
    return file_bytes(*pack(params, rules), entries="quantized", embeddings=embeddings)


def file_bytes(
    tensors: dict[str, np.ndarray],
    meta: dict,
    entries: str,
    meta_key: str = META_KEY,
    embeddings: str = EMBEDDING_LEAVES,
) -> dict[str, int]:
    """Bytes of a packed safetensors file (`tensors` keyed 'path' or 'path:part', `meta`
    listing parameters under `entries` and 'float'), with and without the embeddings (the
    parameters whose path fullmatches the regex `embeddings`)."""
    embedding = re.compile(embeddings)

    def is_embedding(path: str) -> bool:
        return embedding.fullmatch(path) is not None

    def weight(key: str) -> str:
        return key.split(":")[0].removesuffix(SPLIT_SUFFIX)

    rest = {k: v for k, v in tensors.items() if not is_embedding(weight(k))}
    rest_meta = {
        "format": meta["format"],
        entries: {k: v for k, v in meta[entries].items() if not is_embedding(k)},
        "float": [k for k in meta["float"] if not is_embedding(k)],
        **({"tree": meta["tree"]} if "tree" in meta else {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        full, part = Path(tmp) / "all.safetensors", Path(tmp) / "rest.safetensors"
        save_file(tensors, full, metadata={meta_key: json.dumps(meta)})
        save_file(rest, part, metadata={meta_key: json.dumps(rest_meta)})
        return {"bytes": full.stat().st_size, "bytes_no_embeddings": part.stat().st_size}
