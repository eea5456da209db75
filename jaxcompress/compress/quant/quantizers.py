"""Weight quantizers (uniform, fp8 e4m3, ternary, binary, LSQ): pure functions, STE grads."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("symmetric", "asymmetric", "fp8", "ternary", "binary")
GRANULARITIES = ("tensor", "channel", "group")
SCALE_METHODS = ("absmax", "percentile", "mse", "lsq")
TWN_DELTA = 0.7  # TWN's threshold: delta = 0.7 * mean |w|
FP8 = jnp.float8_e4m3fn  # the fp8 scheme's code type: e4m3, no infinities, max 448
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
FP8_INV_MAX = np.float32(1.0 / FP8_MAX)  # fp8 scales are absmax * FP8_INV_MAX
# Values up to half a step (16) above 448 round to 448 in e4m3 (464 ties to it): the fp8
# scheme's clip range, the analogue of [qmin - 1/2, qmax + 1/2] on the integer grids.
FP8_ROUNDS_TO_MAX = FP8_MAX + 16.0

# The entry points are compiled once per shape and spec: called on a tree outside a jitted
# program (export, calibration, splitting), each would otherwise compile its dozen ops one by
# one; inside a jitted program they are inlined as before.
_jit_by_spec = functools.partial(jax.jit, static_argnames="spec")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one parameter is quantized.

    Granularity is defined on the parameter viewed as a matrix [rows, C], C its last axis (a
    Flax kernel [in, out] has one column per output channel): 'tensor' has one scale,
    'channel' one per column, 'group' one per column and per block of `group_size`
    consecutive rows (Q-BERT's group-wise quantization). Scales have shape (), (C,) and
    (rows // group_size, C) respectively.

    The 'fp8' scheme's codes are not integers but float8 e4m3 values (`jnp.float8_e4m3fn`,
    largest 448): a weight is stored as e4m3(w / scale), the scale mapping the clip range
    onto [-448, 448] (absmax: scale = max |w| * float32(1 / 448)), the form Hopper GPUs
    multiply in.

    Attributes:
      bits: the code width of the uniform schemes, 2..8 (None: 8); fp8 is 8 bits, ternary 2
        and binary 1 (None is set to that).
      scheme: 'symmetric' (grid [-(2^(b-1)-1), 2^(b-1)-1]), 'asymmetric' ([0, 2^b-1] with an
        integer zero point), 'fp8' (e4m3 values in [-448, 448], scaled), 'ternary'
        ({-1, 0, 1}, TWN) or 'binary' ({-1, 1}, sign(w) * mean |w|).
      granularity: 'tensor', 'channel' or 'group', as above.
      group_size: rows per group; required with 'group' and only allowed with it.
      scale_method: for the uniform and fp8 schemes 'absmax' (None: this), 'percentile',
        'mse' (a grid search of clip ratios) or 'lsq' (a trained step size, symmetric only);
        must be None for ternary and binary, which have their own scale.
      percentile: for 'percentile', the nearest-rank percentile (0 < p <= 100) of |w|
        (symmetric) or of w at both tails (asymmetric).
      mse_grid: for 'mse', the clip ratios tried are k / mse_grid of the absmax range,
        k = 1..mse_grid.

    Raises:
      ValueError: a field is outside the values above, or fields contradict each other.
    """

    # Uniform schemes: 2..8 (default 8). Fp8 is 8 bits, ternary 2 and binary 1; leave None
    # or say so.
    bits: int | None = None
    # Integer grid: symmetric [-(2^(b-1)-1), 2^(b-1)-1]; asymmetric [0, 2^b-1] with an
    # integer zero point; ternary {-1, 0, 1} (TWN); binary {-1, 1} (sign(w) * mean |w|).
    # Or fp8: float8 e4m3 values in [-448, 448] times the scale.
    scheme: str = "symmetric"
    granularity: str = "channel"  # 'tensor' | 'channel' | 'group'
    group_size: int | None = None  # rows per group; only (and required) with 'group'
    # Uniform and fp8 schemes: 'absmax' (default), 'percentile', 'mse' (grid search of clip
    # ratios) or 'lsq' (a trained step size, symmetric only). Ternary and binary have their
    # own rule.
    scale_method: str | None = None
    # Nearest-rank percentile of |w| (symmetric) or of w at both tails (asymmetric).
    percentile: float = 99.9
    mse_grid: int = 50  # 'mse' tries clip ratios k / mse_grid of the absmax range, k = 1..grid

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"QuantSpec.scheme={self.scheme!r}; expected one of {SCHEMES}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity={self.granularity!r}; expected one of {GRANULARITIES}"
            )
        fixed_bits = {"ternary": 2, "binary": 1}.get(self.scheme)
        if fixed_bits is not None:
            if self.bits not in (None, fixed_bits):
                raise ValueError(
                    f"QuantSpec.bits={self.bits} but {self.scheme} is {fixed_bits} bit(s)"
                )
            if self.scale_method is not None:
                raise ValueError(
                    f"QuantSpec.scale_method={self.scale_method!r} does not apply to "
                    f"{self.scheme} (its scale is mean |w| over the kept weights); leave it None"
                )
            object.__setattr__(self, "bits", fixed_bits)
        else:
            bits = 8 if self.bits is None else self.bits
            if self.scheme == "fp8" and isinstance(bits, int) and bits != 8:
                raise ValueError(f"QuantSpec.bits={self.bits!r} but fp8 (e4m3) is 8 bits")
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"QuantSpec.bits={self.bits!r}; expected an integer in 2..8")
            method = self.scale_method or "absmax"
            if method not in SCALE_METHODS:
                raise ValueError(
                    f"QuantSpec.scale_method={method!r}; expected one of {SCALE_METHODS}"
                )
            if method == "lsq" and self.scheme != "symmetric":
                raise ValueError("QuantSpec.scale_method='lsq' needs scheme='symmetric'")
            object.__setattr__(self, "bits", bits)
            object.__setattr__(self, "scale_method", method)
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} with granularity={self.granularity!r}:"
                " group_size is required with 'group' and only allowed with it"
            )
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"QuantSpec.group_size={self.group_size}; must be >= 1")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"QuantSpec.percentile={self.percentile}; expected 0 < p <= 100")
        if self.mse_grid < 1:
            raise ValueError(f"QuantSpec.mse_grid={self.mse_grid}; must be >= 1")

    @property
    def qmin(self) -> int:
        """Smallest code (fp8: -448, the smallest e4m3 value)."""
        if self.scheme in ("symmetric", "fp8"):
            return -self.qmax
        return {"asymmetric": 0, "ternary": -1, "binary": -1}[self.scheme]

    @property
    def qmax(self) -> int:
        """Largest code (fp8: 448, the largest e4m3 value)."""
        if self.scheme == "symmetric":
            return 2 ** (self.bits - 1) - 1
        if self.scheme == "fp8":
            return int(FP8_MAX)
        return 2**self.bits - 1 if self.scheme == "asymmetric" else 1

    @property
    def code_dtype(self) -> jnp.dtype:
        """The dtype of `quantize`'s codes: float8_e4m3fn for fp8, else int32."""
        return jnp.dtype(FP8 if self.scheme == "fp8" else jnp.int32)

    @property
    def uniform(self) -> bool:
        return self.scheme in ("symmetric", "asymmetric")


class QTensor(NamedTuple):
    """A quantized array: `dequantize` gives (codes - zero_point) * scale, broadcast by group."""

    codes: jax.Array  # the parameter's shape: int32, or float8_e4m3fn (scheme 'fp8')
    scale: jax.Array  # float32: (), (C,) or (rows // group_size, C)
    zero_point: jax.Array | None  # like scale (integer-valued float32); asymmetric only


class TernarySplit(NamedTuple):
    """BinaryBERT's ternary weight splitting of one weight (see `ternary_split`)."""

    latent_a: jax.Array  # full-precision halves: latent_a + latent_b == w (up to rounding)
    latent_b: jax.Array
    codes_a: jax.Array  # int32 in {-1, 1}: the binary halves are codes * scale
    codes_b: jax.Array
    scale: jax.Array  # half the ternary scale, shaped like QuantSpec scales


@jax.custom_jvp
def round_ste(x: jax.Array) -> jax.Array:
    """Round half to even, with the identity as its derivative."""
    return jnp.round(x)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
    return round_ste(*primals), tangents[0]


@jax.custom_jvp
def grad_scale(x: jax.Array, factor: float) -> jax.Array:
    """`x` in the forward pass; its gradient multiplied by `factor` (LSQ's step scaling)."""
    return x


@grad_scale.defjvp
def _grad_scale_jvp(primals, tangents):
    x, factor = primals
    return x, tangents[0] * factor


@jax.custom_jvp
def straight_through(w: jax.Array, wq: jax.Array, inside: jax.Array) -> jax.Array:
    """`wq` in the forward pass; the derivative w.r.t. `w` is 1 where `inside`, else 0."""
    return wq


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _, wq, inside = primals
    return wq, jnp.where(inside, tangents[0], jnp.zeros_like(tangents[0]))


def check_shape(shape: tuple[int, ...], spec: QuantSpec) -> None:
    """Raise if `spec` cannot quantize an array of `shape`."""
    if len(shape) == 0:
        raise ValueError("cannot quantize a scalar; quantize arrays with at least one axis")
    rows = math.prod(shape[:-1])
    if spec.granularity == "group" and rows % spec.group_size:
        raise ValueError(
            f"group_size {spec.group_size} does not divide the {rows} rows of shape {shape} "
            "(groups run over the product of all axes but the last)"
        )


def _view(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, tuple[int, ...]]:
    """`w` as float32 (groups, rows per group, C) and the axes one scale reduces over."""
    check_shape(w.shape, spec)
    rows, cols = math.prod(w.shape[:-1]), w.shape[-1]
    size = spec.group_size if spec.granularity == "group" else rows
    w3 = w.astype(jnp.float32).reshape(rows // size if size else 1, size, cols)
    axes = {"tensor": (0, 1, 2), "channel": (0, 1), "group": (1,)}[spec.granularity]
    return w3, axes


def _natural(s3: jax.Array, spec: QuantSpec) -> jax.Array:
    """A (groups, 1, C)-broadcastable scale in its stored shape."""
    if spec.granularity == "tensor":
        return s3.reshape(())
    return s3[:, 0, :] if spec.granularity == "group" else s3[0, 0, :]


def _expand(s: jax.Array, spec: QuantSpec) -> jax.Array:
    """A stored scale, broadcastable against the (groups, rows per group, C) view."""
    s = jnp.asarray(s, jnp.float32)
    if spec.granularity == "tensor":
        return s.reshape(1, 1, 1)
    return s[:, None, :] if spec.granularity == "group" else s[None, None, :]


def _positive(s: jax.Array) -> jax.Array:
    # An all-zero group gets scale 1: its codes are 0 and dequantize to exactly 0.
    return jnp.where(s > 0, s, jnp.ones_like(s))


def _uniform_params(lo: jax.Array, hi: jax.Array, spec: QuantSpec):
    """Scale and zero point mapping the clip range [lo, hi] onto the scheme's grid."""
    if spec.scheme == "fp8":
        # Times the float32 reciprocal: XLA compiles a division by a constant differently
        # under jit and op by op (not always correctly rounded); a product is the same in both.
        return _positive(jnp.maximum(-lo, hi) * FP8_INV_MAX), jnp.zeros_like(lo)
    if spec.scheme == "symmetric":
        return _positive(jnp.maximum(-lo, hi) / spec.qmax), jnp.zeros_like(lo)
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # keep 0 exactly representable
    s = _positive((hi - lo) / spec.qmax)
    return s, jnp.clip(jnp.round(-lo / s), 0, spec.qmax)


def fp8_round(x: jax.Array) -> jax.Array:
    """The e4m3 value nearest to `x` (ties to even; beyond +-448 clipped to +-448), as float32.

    Args:
      x: any float array.

    Returns:
      `jnp.asarray(clip(x, -448, 448), float8_e4m3fn).astype(float32)`, in `x`'s shape.
    """
    x = jnp.clip(jnp.asarray(x, jnp.float32), -FP8_MAX, FP8_MAX)
    return x.astype(FP8).astype(jnp.float32)


def _uniform_codes(w3, s3, zp3, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Codes on the scheme's grid as float32, and where w lies inside the clip range."""
    if spec.scheme == "fp8":
        r = w3 / s3
        # Inside: e4m3 rounding alone lands on a finite value (|r| <= 448 + half a step).
        return fp8_round(r), jnp.abs(r) <= FP8_ROUNDS_TO_MAX
    r = jnp.round(w3 / s3 + zp3)
    # Inside the clip range: rounding alone lands on the grid, i.e. w/s + zp lies in
    # [qmin - 1/2, qmax + 1/2]; this keeps the absmax weight inside despite float rounding.
    inside = (r >= spec.qmin) & (r <= spec.qmax)
    return jnp.clip(r, spec.qmin, spec.qmax), inside


def _dequant(q: jax.Array, s3: jax.Array, zp3: jax.Array | None) -> jax.Array:
    # The single formula shared by fake quantization and artefact loading: bit-exact.
    return q * s3 if zp3 is None else (q - zp3) * s3


def _mse_params(w3, axes, spec: QuantSpec):
    """Scale and zero point of the clip ratio with the least squared error, per scale."""
    lo0 = jnp.min(w3, axis=axes, keepdims=True)
    hi0 = jnp.max(w3, axis=axes, keepdims=True)
    ratios = jnp.arange(1, spec.mse_grid + 1, dtype=jnp.float32) / spec.mse_grid

    def try_ratio(best, r):
        s, zp = _uniform_params(lo0 * r, hi0 * r, spec)
        q, _ = _uniform_codes(w3, s, zp, spec)
        err = jnp.sum(jnp.square(_dequant(q, s, zp) - w3), axis=axes, keepdims=True)
        better = err < best[0]
        return tuple(
            jnp.where(better, new, old) for new, old in zip((err, s, zp), best, strict=True)
        ), None

    s1, zp1 = _uniform_params(lo0, hi0, spec)
    init = (jnp.full_like(s1, jnp.inf), s1, zp1)
    (_, s, zp), _ = jax.lax.scan(try_ratio, init, ratios)
    return s, zp


def _percentile(x: jax.Array, p: float, axes: tuple[int, ...]) -> jax.Array:
    # Nearest rank, no interpolation: a selected value is reproduced bit for bit under jit,
    # where XLA may fuse an interpolation differently than eager execution does.
    return jnp.percentile(x, p, axis=axes, keepdims=True, method="nearest")


def _twn_kept(w3: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Where |w| exceeds TWN's threshold 0.7 * mean |w| (per scale)."""
    a = jnp.abs(w3)
    return a > TWN_DELTA * jnp.mean(a, axis=axes, keepdims=True)


def _scale3(w3, axes, spec: QuantSpec):
    """Scale and zero point in view shape, computed from the weights (no gradient)."""
    if spec.scheme in ("ternary", "binary"):
        a = jnp.abs(w3)
        if spec.scheme == "binary":
            return _positive(jnp.mean(a, axis=axes, keepdims=True)), None
        kept = _twn_kept(w3, axes)
        count = jnp.maximum(jnp.sum(kept, axis=axes, keepdims=True), 1)
        return _positive(jnp.sum(jnp.where(kept, a, 0.0), axis=axes, keepdims=True) / count), None
    if spec.scale_method == "lsq":
        raise ValueError("scale_method='lsq' needs the learned step: pass scale=")
    if spec.scale_method == "mse":
        s, zp = _mse_params(w3, axes, spec)
    elif spec.scale_method == "percentile" and spec.scheme in ("symmetric", "fp8"):
        c = _percentile(jnp.abs(w3), spec.percentile, axes)
        s, zp = _uniform_params(-c, c, spec)
    elif spec.scale_method == "percentile":
        lo = _percentile(w3, 100.0 - spec.percentile, axes)
        hi = _percentile(w3, spec.percentile, axes)
        s, zp = _uniform_params(lo, hi, spec)
    else:
        lo = jnp.min(w3, axis=axes, keepdims=True)
        hi = jnp.max(w3, axis=axes, keepdims=True)
        s, zp = _uniform_params(lo, hi, spec)
    return s, (zp if spec.scheme == "asymmetric" else None)


def _codes3(w3, axes, spec: QuantSpec, scale=None, zero_point=None):
    """(float codes, scale, zero point, inside) in view shape; no gradient flows."""
    w3 = jax.lax.stop_gradient(w3)
    if w3.size == 0:
        tensor = spec.granularity == "tensor"
        s3 = jnp.ones((1, 1, 1) if tensor else (w3.shape[0], 1, w3.shape[2]), jnp.float32)
        return w3, s3, (s3 * 0 if spec.scheme == "asymmetric" else None), w3 == 0
    if scale is None:
        s3, zp3 = _scale3(w3, axes, spec)
    else:
        s3 = _expand(scale, spec)
        zp3 = _expand(zero_point, spec) if spec.scheme == "asymmetric" else None
    s3 = jax.lax.stop_gradient(s3)
    if spec.scheme == "ternary" and scale is None:
        kept = _twn_kept(w3, axes)
        return jnp.where(kept, jnp.sign(w3), 0.0), s3, None, jnp.ones_like(kept)
    if spec.scheme == "binary":
        return jnp.where(w3 >= 0, 1.0, -1.0), s3, None, jnp.ones(w3.shape, bool)
    q, inside = _uniform_codes(w3, s3, 0.0 if zp3 is None else zp3, spec)
    if spec.scheme == "ternary":  # a given scale: the nearest of {-s, 0, s}
        inside = jnp.ones_like(inside)
    return q, s3, zp3, inside


@_jit_by_spec
def quantize(
    w: jax.Array,
    spec: QuantSpec,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
) -> QTensor:
    """Codes and scales of `w`; scales come from `spec.scale_method` unless given.

    With a given scale, ternary codes are the nearest of {-1, 0, 1} (threshold scale / 2).

    Args:
      w: the weight, with at least one axis; its last axis is the channel axis.
      spec: how to quantize it.
      scale: the scale in the spec's scale shape; None: computed from `w`.
      zero_point: with `scale`, the zero point of an asymmetric spec (ignored otherwise).

    Returns:
      A `QTensor`: codes in `w`'s shape as `spec.code_dtype` (int32; fp8: the e4m3 values
      of w / scale, float8_e4m3fn), scales in the spec's scale shape, the zero point
      (asymmetric only).
    """
    w3, axes = _view(w, spec)
    q, s3, zp3, _ = _codes3(w3, axes, spec, scale, zero_point)
    zp = None if zp3 is None else _natural(zp3, spec)
    return QTensor(q.astype(spec.code_dtype).reshape(w.shape), _natural(s3, spec), zp)


@_jit_by_spec
def dequantize(qt: QTensor, spec: QuantSpec) -> jax.Array:
    """The float32 values `qt` stands for.

    Args:
      qt: codes, scale and zero point, as `quantize` returns them.
      spec: the spec `qt` was quantized with (its granularity places the scales).

    Returns:
      `(codes - zero_point) * scale` (no zero point: `codes * scale`) as float32, in the
      codes' shape.
    """
    q3, _ = _view(qt.codes.astype(jnp.float32), spec)
    zp3 = None if qt.zero_point is None else _expand(qt.zero_point, spec)
    return _dequant(q3, _expand(qt.scale, spec), zp3).reshape(qt.codes.shape)


@_jit_by_spec
def fake_quant(
    w: jax.Array,
    spec: QuantSpec,
    scale: jax.Array | None = None,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """`dequantize(quantize(w))` with a straight-through gradient, in `w`'s dtype.

    Uniform schemes pass the gradient where round(w/s + zp) lies on the integer grid (the
    clip range [qmin - 1/2, qmax + 1/2] in steps) and zero it outside; fp8 passes it where
    e4m3 rounding of w/s needs no clipping (|w/s| <= 464, half a step above 448);
    ternary and binary pass it everywhere (TernaryBERT, BinaryBERT). `scale_method='lsq'`
    needs the learned step as `scale` and goes through `lsq_fake_quant`.

    Args:
      w: the weight, with at least one axis; its last axis is the channel axis.
      spec: how to quantize it.
      scale: the scale in the spec's scale shape; None: computed from `w` by
        `spec.scale_method` (no gradient flows into it).
      zero_point: with `scale`, the zero point of an asymmetric spec (ignored otherwise).

    Returns:
      The quantized values of `w`, in its shape and dtype.

    Raises:
      ValueError: `w` is a scalar, `spec.group_size` does not divide its rows, or
        `scale_method='lsq'` without `scale`.
    """
    if spec.scale_method == "lsq":
        if scale is None:
            raise ValueError("scale_method='lsq' needs the learned step: pass scale=")
        return lsq_fake_quant(w, scale, spec)
    w3, axes = _view(w, spec)
    q, s3, zp3, inside = _codes3(w3, axes, spec, scale, zero_point)
    wq = _dequant(q, s3, zp3).reshape(w.shape).astype(w.dtype)
    return straight_through(w, wq, inside.reshape(w.shape))


@_jit_by_spec
def lsq_init(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """LSQ's initial step, 2 * mean |w| / sqrt(Qp), in the spec's scale shape."""
    w3, axes = _view(w, spec)
    step = 2.0 * jnp.mean(jnp.abs(w3), axis=axes, keepdims=True) / math.sqrt(spec.qmax)
    return _natural(_positive(step), spec)


def lsq_fake_quant(w: jax.Array, step: jax.Array, spec: QuantSpec) -> jax.Array:
    """LSQ (Esser et al. 2020): s * round(clip(w / s, -Qn, Qp)) with a trainable step s.

    Gradients: w gets the straight-through estimate (1 inside the clip range); s gets LSQ's
    round(w/s) - w/s inside and the clipped code outside, scaled by 1 / sqrt(N * Qp) where N
    is the number of weights sharing the step.
    """
    if spec.scale_method != "lsq":
        raise ValueError(f"lsq_fake_quant needs scale_method='lsq', got {spec.scale_method!r}")
    w3, axes = _view(w, spec)
    n = math.prod(w3.shape[a] for a in axes)
    s3 = grad_scale(_expand(step, spec), 1.0 / math.sqrt(max(n, 1) * spec.qmax))
    x = w3 / s3
    clipped = jnp.where(x < spec.qmin, spec.qmin, jnp.where(x > spec.qmax, spec.qmax, x))
    return _dequant(round_ste(clipped), s3, None).reshape(w.shape).astype(w.dtype)


@_jit_by_spec
def ternary_split(w: jax.Array, spec: QuantSpec) -> TernarySplit:
    """BinaryBERT's ternary weight splitting: w = latent_a + latent_b, with

    binary(latent_a) + binary(latent_b) = ternary(w), where binary(v) = sign(v) * mean |v|
    per scale. The returned halves `codes_a * scale` and `codes_b * scale` (scale = the
    ternary scale / 2) add up to `fake_quant(w, spec)` exactly, and equal the binary
    quantization of the latents up to float rounding of the means.

    Args:
      w: the weight, with at least one axis.
      spec: a ternary spec; its granularity sets which weights share a scale.

    Returns:
      A `TernarySplit`: the latents in `w`'s shape and dtype, the int32 codes in {-1, 1} of
      both halves, and their common scale in the spec's scale shape.

    Raises:
      ValueError: `spec.scheme` is not 'ternary', or `w` cannot be quantized with `spec`
        (a scalar, or a group size that does not divide its rows).
    """
    if spec.scheme != "ternary":
        raise ValueError(f"ternary_split needs scheme='ternary', got {spec.scheme!r}")
    w3, axes = _view(w, spec)
    t, s3, _, _ = _codes3(w3, axes, spec)
    a = jnp.abs(w3)
    nonzero, pos, neg = t != 0, (t == 0) & (w3 > 0), (t == 0) & (w3 <= 0)

    def total(mask):
        return jnp.sum(jnp.where(mask, a, 0.0), axis=axes, keepdims=True)

    def count(mask):
        return jnp.sum(mask, axis=axes, keepdims=True)

    s_i, s_j, s_k = total(nonzero), total(pos), total(neg)
    n = math.prod(w3.shape[ax] for ax in axes)
    # Equal means: mean|latent_a| = mean|latent_b| = scale / 2; solved for a and b.
    frac = (s_i - s_j + s_k) / (2.0 * jnp.maximum(s_i, 1e-30))
    b = (n * s3 - s_i - s_j - s_k) / (2.0 * jnp.maximum(count(pos) + count(neg), 1))
    latent_a = jnp.where(nonzero, frac * w3, jnp.where(pos, b + w3, b))
    latent_b = jnp.where(nonzero, (1.0 - frac) * w3, jnp.where(pos, -b, w3 - b))
    codes_a = jnp.where(nonzero, t, 1.0)
    codes_b = jnp.where(nonzero, t, -1.0)
    shape = w.shape
    return TernarySplit(
        latent_a.reshape(shape).astype(w.dtype),
        latent_b.reshape(shape).astype(w.dtype),
        codes_a.astype(jnp.int32).reshape(shape),
        codes_b.astype(jnp.int32).reshape(shape),
        _natural(s3 / 2.0, spec),
    )
