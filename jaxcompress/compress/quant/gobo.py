"""GOBO post-training weight quantization (Zadeh et al. 2020): Gaussian centroids plus outliers.

GOBO needs no data and no retraining. Per weight matrix it fits a Gaussian (mean, std) to
the weights; the few weights far out in its tails are *outliers*, kept exactly as float32
(flat index + value); the rest, the *Gaussian group*, are clustered into 2^bits centroids by
1-D Lloyd iterations (k-means), starting from centroids spread uniformly over the group's
range and stopping as soon as the total absolute (L1) error stops improving (GOBO's stopping
rule). Each weight is stored as a `bits`-bit code into the centroid table.

Outlier threshold: GOBO calls a weight an outlier when its log-density under the fitted
Gaussian is below -4, which makes about 0.1% of BERT's weights outliers. That threshold
depends on the weights' scale (log N(w) = -log(std * sqrt(2 pi)) - z^2 / 2 with
z = (w - mean) / std), so we use the scale-free equivalent |z| > `outlier_sigma` instead,
with default 3.29: a Gaussian puts 0.1% of its mass beyond 3.29 std, GOBO's outlier budget.
(GOBO's -4 equals |z| > sqrt(2 * (4 - log(std * sqrt(2 pi)))), e.g. 3.55 at std = 0.04.)

`gobo(params, rules)` quantizes what the rules select; `gobo_save` / `gobo_load` write and
read a safetensors file with the codes packed at exactly `bits` bits a weight.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.compress.quant.pack import (
    EMBEDDING_LEAVES,
    Packed,
    build_tree,
    describe_tree,
    file_bytes,
    read_packed,
    write_packed,
)
from jaxcompress.compress.quant.qat import KERNELS

META_KEY = "jaxcompress.gobo"  # the JSON description, in the safetensors header metadata
FORMAT = 1
CODES, CENTROIDS, OUTLIER_INDEX, OUTLIER_VALUE = (
    ":codes",
    ":centroids",
    ":outlier_index",
    ":outlier_value",
)
INITS = ("uniform", "quantile")
# Two-sided Gaussian tail of 0.1%: P(|z| > 3.2905) = 0.001, GOBO's outlier fraction.
OUTLIER_SIGMA = 3.29


@dataclasses.dataclass(frozen=True)
class GoboSpec:
    """How GOBO quantizes one weight matrix.

    Attributes:
      bits: the code width, 2..8: 2^bits centroids for the Gaussian group.
      outlier_sigma: outliers are the weights with |w - mean| > outlier_sigma * std (mean
        and std of the whole matrix), > 0; math.inf keeps no outliers (plain 1-D k-means).
      iterations: at most this many Lloyd steps, >= 0; 0 keeps the initial centroids.
      init: the initial centroids: 'uniform' (evenly spaced over the Gaussian group's
        [min, max], GOBO's) or 'quantile' (at the mid-quantiles (k + 1/2) / 2^bits of the
        Gaussian group).

    Raises:
      ValueError: a field is outside the values above.
    """

    bits: int = 3  # code width: 2^bits centroids for the Gaussian group, 2..8
    # Outliers: |w - mean| > outlier_sigma * std (mean, std of the whole matrix); math.inf
    # keeps no outliers (plain 1-D k-means).
    outlier_sigma: float = OUTLIER_SIGMA
    iterations: int = 20  # at most this many Lloyd steps; 0 keeps the initial centroids
    # Initial centroids: 'uniform' (evenly spaced over the Gaussian group's [min, max], GOBO)
    # or 'quantile' (at the mid-quantiles (k + 1/2) / 2^bits of the Gaussian group).
    init: str = "uniform"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"GoboSpec.bits={self.bits!r}; expected an integer in 2..8")
        if not self.outlier_sigma > 0:
            raise ValueError(f"GoboSpec.outlier_sigma={self.outlier_sigma}; must be > 0")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"GoboSpec.iterations={self.iterations!r}; must be an integer >= 0")
        if self.init not in INITS:
            raise ValueError(f"GoboSpec.init={self.init!r}; expected one of {INITS}")


GOBO3 = GoboSpec(bits=3)


class GoboTensor(NamedTuple):
    """One GOBO-quantized weight: `centroids[codes]`, then outliers written back by index."""

    codes: np.ndarray  # uint8, the weight's shape, values < 2^bits
    centroids: np.ndarray  # float32 [2^bits], ascending
    outlier_index: np.ndarray  # int32 [n]: ascending flat (C-order) indices
    outlier_value: np.ndarray  # float32 [n]: the original weights there

    @property
    def bits(self) -> int:
        """Code width in bits."""
        return int(self.centroids.size).bit_length() - 1


class Fit(NamedTuple):
    """Lloyd iterations' result on the Gaussian group."""

    centroids: np.ndarray  # float32 [2^bits], ascending
    codes: np.ndarray  # uint8, one per value of the group
    errors: list[float]  # total absolute error of the initial and of each accepted step


def default_rules(kernels: GoboSpec | None = GOBO3) -> list[tuple[str, GoboSpec | None]]:
    """Rules for any model: every `kernel` leaf (as in `qat.default_rules`) gets `kernels`;
    everything else stays float. BERT's preset, which can also quantize its embedding
    tables, is `models.bert_rules.weight_rules(kernels, embeddings)`."""
    return [(KERNELS, kernels)]


def outlier_mask(w: np.ndarray, outlier_sigma: float) -> np.ndarray:
    """Where |w - mean| > outlier_sigma * std, mean and std over all of `w` (float64)."""
    x = np.asarray(w, np.float64)
    mean, std = x.mean(), x.std()
    return np.abs(x - mean) > outlier_sigma * std


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of the nearest of the ascending `centroids` for each value (uint8)."""
    mid = (centroids[:-1] + centroids[1:]) / 2.0
    return np.searchsorted(mid, x, side="left").astype(np.uint8)


def l1_error(x: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> float:
    """Total absolute error of representing `x` by `centroids[codes]`."""
    return float(np.sum(np.abs(x - centroids[codes])))


def initial_centroids(x: np.ndarray, bits: int, init: str = "uniform") -> np.ndarray:
    """2^bits ascending float32 centroids for the values `x` ('uniform' or 'quantile')."""
    k = 2**bits
    if x.size == 0:
        return np.zeros(k, np.float32)
    if init == "uniform":
        c = np.linspace(x.min(), x.max(), k)
    elif init == "quantile":
        c = np.quantile(x, (np.arange(k) + 0.5) / k)
    else:
        raise ValueError(f"init={init!r}; expected one of {INITS}")
    return np.sort(np.asarray(c, np.float64).astype(np.float32))


def lloyd_step(x: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each centroid moved to the mean of its values, as ascending float32.

    A centroid with no values (common at 6-8 bits, where uniform spacing puts centroids in
    the sparse tails) is moved onto the value worst represented now, as k-means
    implementations usually do, so that every code stays useful.
    """
    k = centroids.size
    counts = np.bincount(codes, minlength=k)
    sums = np.bincount(codes, weights=x, minlength=k)
    moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    empty = np.flatnonzero(counts == 0)
    if empty.size and x.size:
        worst = np.argsort(-np.abs(x - centroids[codes]), kind="stable")[: empty.size]
        moved[empty[: worst.size]] = x[worst]
    return np.sort(moved.astype(np.float32))


def lloyd(x: np.ndarray, centroids: np.ndarray, iterations: int) -> Fit:
    """Up to `iterations` Lloyd steps from `centroids`, stopping (and keeping the previous
    centroids) as soon as a step does not lower the total absolute error: GOBO's rule."""
    x = np.asarray(x, np.float32).astype(np.float64).reshape(-1)
    c = np.sort(np.asarray(centroids, np.float32))
    codes = assign(x, c.astype(np.float64))
    errors = [l1_error(x, c.astype(np.float64), codes)]
    for _ in range(iterations):
        new = lloyd_step(x, c, codes)
        new_codes = assign(x, new.astype(np.float64))
        err = l1_error(x, new.astype(np.float64), new_codes)
        if not err < errors[-1]:
            break
        c, codes = new, new_codes
        errors.append(err)
    return Fit(c, codes, errors)


def gobo_quantize(w: Any, spec: GoboSpec) -> GoboTensor:
    """GOBO codes, centroids and outliers of one weight array (any shape, at least one value).

    Runs in NumPy (not traceable under `jax.jit`), deterministically.

    Args:
      w: the weight, any array-like; it is read as float32.
      spec: the code width, outlier threshold and Lloyd iterations.

    Returns:
      A `GoboTensor`: uint8 codes in `w`'s shape, the ascending float32 centroids, and the
      outliers' flat indices and original values. Outliers also get a code (of the nearest
      centroid), which `gobo_dequantize` overwrites.

    Raises:
      ValueError: `w` is empty, or has more values than int32 indices can address.
    """
    w = np.asarray(w, np.float32)
    if w.size == 0:
        raise ValueError("cannot GOBO-quantize an empty array")
    if w.size > np.iinfo(np.int32).max:
        raise ValueError(f"array of {w.size} values is too large for int32 outlier indices")
    flat = w.reshape(-1)
    outliers = outlier_mask(flat, spec.outlier_sigma)
    group = flat[~outliers]
    fit = lloyd(group, initial_centroids(group, spec.bits, spec.init), spec.iterations)
    codes = assign(flat.astype(np.float64), fit.centroids.astype(np.float64))
    index = np.flatnonzero(outliers).astype(np.int32)
    return GoboTensor(codes.reshape(w.shape), fit.centroids, index, flat[index].copy())


def gobo_dequantize(t: GoboTensor) -> jax.Array:
    """The float32 weight `t` stands for: centroids[codes] with the outliers written back.

    Args:
      t: a `GoboTensor`, as `gobo_quantize` returns it.

    Returns:
      A float32 `jax.Array` in the codes' shape.
    """
    flat = np.asarray(t.centroids, np.float32)[np.asarray(t.codes).reshape(-1)]
    flat[np.asarray(t.outlier_index)] = np.asarray(t.outlier_value, np.float32)
    return jnp.asarray(flat.reshape(np.shape(t.codes)))


def _check_rules(rules: core.Rules) -> None:
    for pattern, spec in rules:
        if spec is not None and not isinstance(spec, GoboSpec):
            raise ValueError(f"gobo rule {pattern!r}: expected a GoboSpec or None, got {spec!r}")


def gobo(params: core.Params, rules: core.Rules) -> tuple[core.Params, dict[str, GoboTensor]]:
    """The params with every selected weight replaced by its GOBO reconstruction (in the
    weight's dtype), and the GOBO tensors by path. One-shot, offline, deterministic."""
    _check_rules(rules)
    selected = core.match_rules(params, rules, name="gobo")
    quantized: dict[str, GoboTensor] = {}

    def visit(key_path, leaf):
        path = core.path_str(key_path)
        if path not in selected:
            return leaf
        try:
            quantized[path] = gobo_quantize(leaf, selected[path])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return gobo_dequantize(quantized[path]).astype(jnp.asarray(leaf).dtype)

    return jax.tree_util.tree_map_with_path(visit, params), quantized


def pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """Values below 2^bits at exactly `bits` bits each (little-endian bit order), as uint8:
    ceil(n * bits / 8) bytes. Unlike `quant_pack.pack_bits`, any width 1..8 is dense."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}; expected 1..8")
    flat = np.asarray(u, np.uint8).reshape(-1)
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` values packed by `pack_codes`, as uint8."""
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (planes.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint8)


def _flat(tree: core.Params) -> list[tuple[str, Any]]:
    return [(core.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def gobo_pack(
    params: core.Params, quantized: dict[str, GoboTensor]
) -> tuple[dict[str, np.ndarray], dict]:
    """The named arrays and JSON description of a GOBO file: packed codes, centroids and
    outliers for the paths in `quantized`, every other leaf of `params` as it is."""
    leaves = dict(_flat(params))
    missing = sorted(set(quantized) - set(leaves))
    if missing:
        raise ValueError(f"quantized paths {missing} are not leaves of params")
    tensors: dict[str, np.ndarray] = {}
    meta: dict = {"format": FORMAT, "gobo": {}, "float": []}
    if (tree := describe_tree(params)) is not None:
        meta["tree"] = tree
    for path, leaf in leaves.items():
        if path not in quantized:
            tensors[path] = np.asarray(leaf)
            meta["float"].append(path)
            continue
        t = quantized[path]
        tensors[path + CODES] = pack_codes(t.codes, t.bits)
        tensors[path + CENTROIDS] = np.asarray(t.centroids, np.float32)
        tensors[path + OUTLIER_INDEX] = np.asarray(t.outlier_index, np.int32)
        tensors[path + OUTLIER_VALUE] = np.asarray(t.outlier_value, np.float32)
        meta["gobo"][path] = {
            "shape": list(np.shape(t.codes)),
            "dtype": str(np.asarray(leaf).dtype),
            "bits": t.bits,
        }
    return tensors, meta


def gobo_unpack(
    tensors: dict[str, np.ndarray], meta: dict, like: Any = None
) -> tuple[core.Params, dict[str, GoboTensor]]:
    """The dequantized params (bit-exact with `gobo`), in the saved structure or `like`'s
    (see `pack.build_tree`), and the GOBO tensors of a packed file."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown GOBO artefact format {meta.get('format')!r}")
    flat = {path: jnp.asarray(tensors[path]) for path in meta["float"]}
    quantized = {}
    for path, info in meta["gobo"].items():
        shape, bits = tuple(info["shape"]), int(info["bits"])
        codes = unpack_codes(tensors[path + CODES], bits, math.prod(shape)).reshape(shape)
        t = GoboTensor(
            codes,
            np.asarray(tensors[path + CENTROIDS], np.float32),
            np.asarray(tensors[path + OUTLIER_INDEX], np.int32),
            np.asarray(tensors[path + OUTLIER_VALUE], np.float32),
        )
        quantized[path] = t
        flat[path] = gobo_dequantize(t).astype(info["dtype"])
    return build_tree(flat, meta.get("tree"), like), quantized


def gobo_save(
    path: str | os.PathLike, params: core.Params, quantized: dict[str, GoboTensor]
) -> Path:
    """Write one safetensors file holding `gobo_pack(params, quantized)`."""
    return write_packed(path, Packed(*gobo_pack(params, quantized)), META_KEY)


def gobo_load(
    path: str | os.PathLike, like: Any = None
) -> tuple[core.Params, dict[str, GoboTensor]]:
    """The dequantized params (in the saved structure, or `like`'s) and GOBO tensors of a
    file written by `gobo_save`."""
    return gobo_unpack(*read_packed(path, META_KEY, kind="GOBO"), like=like)


def gobo_packed_bytes(
    params: core.Params, quantized: dict[str, GoboTensor], embeddings: str = EMBEDDING_LEAVES
) -> dict[str, int]:
    """Bytes of the GOBO file, with and without the embedding tables (leaves whose path
    fullmatches `embeddings`), measured by writing the files (see `pack.packed_bytes`)."""
    return file_bytes(
        *gobo_pack(params, quantized), entries="gobo", meta_key=META_KEY, embeddings=embeddings
    )
