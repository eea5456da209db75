"""Packed quantized artefacts: codes at 1, 2, 4 or 8 bits a value, scales beside, in safetensors."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxcompress import core
from jaxcompress.compress.quant.qat import SPLIT_SUFFIX, quantize_tree
from jaxcompress.compress.quant.quantizers import QTensor, QuantSpec, dequantize
from jaxcompress.models.artefact import is_embedding

META_KEY = "jaxcompress.quant"  # the JSON description, in the safetensors header metadata
FORMAT = 1
CODES, SCALE, ZERO_POINT = ":codes", ":scale", ":zero_point"


class Packed(NamedTuple):
    """What goes into the file: named numpy arrays and the JSON-able description."""

    tensors: dict[str, np.ndarray]
    meta: dict


def container_bits(spec: QuantSpec) -> int:
    """Bits each code occupies in the file: 1 (binary), 2 (ternary, 2-bit), 4 (3-4) or 8."""
    return next(width for width in (1, 2, 4, 8) if spec.bits <= width)


def to_unsigned(codes: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Codes shifted to 0..2^bits - 1 (binary -1/1 to 0/1), as uint8."""
    codes = np.asarray(codes, np.int32)
    u = (codes + 1) // 2 if spec.scheme == "binary" else codes - spec.qmin
    return u.astype(np.uint8)


def from_unsigned(u: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The inverse of `to_unsigned`, as int32 codes."""
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


def pack(params: core.Params, rules: core.Rules) -> Packed:
    """Codes, scales and zero points of the weights `rules` select; other leaves as they are.

    LSQ steps in `params` (see `qat.add_lsq_steps`) become the stored scales; a weight split
    in two binary halves (`qat.add_binary_split`) stores both halves' codes.
    """
    model, quantized = quantize_tree(params, rules)
    tensors: dict[str, np.ndarray] = {}
    meta: dict = {"format": FORMAT, "quantized": {}, "float": []}
    for path, leaf in _flat(model):
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
    return [(core.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def unpack(packed: Packed) -> tuple[dict, dict[str, tuple[QTensor, QuantSpec]]]:
    """The dequantized float params (bit-exact with `qat(rules).apply`) and the codes."""
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
    return unflatten_dict(flat, sep="/"), codes


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
    """Write one safetensors file: packed codes, scales, float leaves, and the JSON meta."""
    return write_packed(path, pack(params, rules))


def read(path: str | os.PathLike) -> Packed:
    """The arrays and description of a file written by `save`."""
    return read_packed(path)


def load(path: str | os.PathLike) -> dict:
    """The dequantized float params of a file written by `save`."""
    return unpack(read(path))[0]


def packed_bytes(params: core.Params, rules: core.Rules) -> dict[str, int]:
    """Bytes of the packed file, with and without the embedding tables, measured by writing
    the files (the counterpart of `artefact.saved_bytes`)."""
    return file_bytes(*pack(params, rules), entries="quantized")


def file_bytes(
    tensors: dict[str, np.ndarray], meta: dict, entries: str, meta_key: str = META_KEY
) -> dict[str, int]:
    """Bytes of a packed safetensors file (`tensors` keyed 'path' or 'path:part', `meta`
    listing parameters under `entries` and 'float'), with and without the embeddings."""

    def weight(key: str) -> str:
        return key.split(":")[0].removesuffix(SPLIT_SUFFIX)

    rest = {k: v for k, v in tensors.items() if not is_embedding(weight(k))}
    rest_meta = {
        "format": meta["format"],
        entries: {k: v for k, v in meta[entries].items() if not is_embedding(k)},
        "float": [k for k in meta["float"] if not is_embedding(k)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        full, part = Path(tmp) / "all.safetensors", Path(tmp) / "rest.safetensors"
        save_file(tensors, full, metadata={meta_key: json.dumps(meta)})
        save_file(rest, part, metadata={meta_key: json.dumps(rest_meta)})
        return {"bytes": full.stat().st_size, "bytes_no_embeddings": part.stat().st_size}
