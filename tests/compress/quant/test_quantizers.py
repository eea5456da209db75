"""Quantizers (uniform, ternary, binary, LSQ, splitting): grids, STE gradients, spec errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.compress.quant.quantizers import (
    QuantSpec,
    dequantize,
    fake_quant,
    lsq_fake_quant,
    lsq_init,
    quantize,
    ternary_split,
)


def spec_id(spec: QuantSpec) -> str:
    return f"{spec.scheme}{spec.bits}-{spec.granularity}-{spec.scale_method}"


def weights(shape=(16, 8), seed=0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape) * 0.05


def by_group(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """x [rows, C] as one row per scale: (scales, elements per scale)."""
    rows, cols = x.shape
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    size = spec.group_size or rows
    return x.reshape(rows // size, size, cols).transpose(0, 2, 1).reshape(-1, size)


def expand(scale: np.ndarray, spec: QuantSpec, rows: int) -> np.ndarray:
    """A stored scale broadcast to the kernel's shape."""
    scale = np.asarray(scale)
    if spec.granularity == "group":
        return np.repeat(scale, spec.group_size, axis=0)
    return np.broadcast_to(scale, (rows, *scale.shape[-1:])) if scale.ndim else scale


UNIFORM = [
    QuantSpec(8),
    QuantSpec(8, granularity="tensor"),
    QuantSpec(4, granularity="group", group_size=4),
    QuantSpec(2),
    QuantSpec(3, "asymmetric"),
    QuantSpec(8, "asymmetric", "group", 8),
    QuantSpec(4, scale_method="percentile", percentile=95.0),
    QuantSpec(5, "asymmetric", "tensor", scale_method="percentile", percentile=90.0),
    QuantSpec(3, scale_method="mse"),
    QuantSpec(6, "asymmetric", scale_method="mse"),
]
FP8_SPECS = [
    QuantSpec(scheme="fp8"),
    QuantSpec(scheme="fp8", granularity="tensor"),
    QuantSpec(scheme="fp8", granularity="group", group_size=4, scale_method="mse"),
    QuantSpec(scheme="fp8", scale_method="percentile", percentile=95.0),
]
SPECS = [
    *UNIFORM,
    *FP8_SPECS,
    QuantSpec(scheme="ternary"),
    QuantSpec(scheme="ternary", granularity="tensor"),
    QuantSpec(scheme="binary", granularity="group", group_size=8),
]


def test_int8_symmetric_is_the_textbook_definition():
    w = np.asarray(weights())
    s = np.max(np.abs(w)) / np.float32(127)
    expected = np.clip(np.round(w / s), -127, 127) * s
    np.testing.assert_array_equal(fake_quant(w, QuantSpec(8, granularity="tensor")), expected)
    s_c = np.max(np.abs(w), axis=0) / np.float32(127)
    expected_c = np.clip(np.round(w / s_c), -127, 127) * s_c
    np.testing.assert_array_equal(fake_quant(w, QuantSpec(8)), expected_c)
    np.testing.assert_array_equal(quantize(w, QuantSpec(8)).scale, s_c)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_quantizer_grid_idempotence_error_and_scales(spec):
    w = weights()
    qt = quantize(w, spec)
    wq = fake_quant(w, spec)
    codes, scale = np.asarray(qt.codes), np.asarray(qt.scale)
    assert np.all(scale > 0)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    np.testing.assert_array_equal(dequantize(qt, spec), wq)
    # A projection onto its grid: quantizing again with the same scale changes nothing.
    np.testing.assert_array_equal(fake_quant(wq, spec, qt.scale, qt.zero_point), wq)
    if spec.scale_method != "percentile":  # scales recomputed from q(w) describe the same grid
        np.testing.assert_array_equal(quantize(wq, spec).codes, codes)
        np.testing.assert_allclose(fake_quant(wq, spec), wq, rtol=1e-6, atol=0)
    if spec.uniform:
        s = expand(scale, spec, w.shape[0])
        zp = 0 if qt.zero_point is None else expand(qt.zero_point, spec, w.shape[0])
        r = np.round(np.asarray(w) / s + zp)
        inside = (r >= spec.qmin) & (r <= spec.qmax)
        err = np.abs(np.asarray(wq) - np.asarray(w))
        assert np.all(err[inside] <= np.broadcast_to(s, w.shape)[inside] * 0.5 * (1 + 1e-6))


@pytest.mark.parametrize("spec", SPECS[-3:], ids=spec_id)
def test_ternary_and_binary_levels(spec):
    w = np.asarray(weights())
    wq = np.asarray(fake_quant(w, spec))
    levels = 3 if spec.scheme == "ternary" else 2
    for group in by_group(wq, spec):
        assert len(np.unique(group)) == levels
    if spec.scheme == "ternary":  # TWN by hand
        for wg, qg in zip(by_group(w, spec), by_group(wq, spec), strict=True):
            kept = np.abs(wg) > 0.7 * np.mean(np.abs(wg))
            np.testing.assert_array_equal(qg != 0, kept)
            np.testing.assert_allclose(
                np.abs(qg[kept]), np.mean(np.abs(wg[kept])), rtol=1e-6, atol=1e-7
            )
    else:
        for wg, qg in zip(by_group(w, spec), by_group(wq, spec), strict=True):
            np.testing.assert_array_equal(np.sign(qg), np.where(wg >= 0, 1, -1))
            np.testing.assert_allclose(np.abs(qg), np.mean(np.abs(wg)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, granularity="tensor", scale_method="percentile", percentile=80.0),
        QuantSpec(3, "asymmetric", scale_method="percentile", percentile=85.0),
    ],
    ids=spec_id,
)
def test_ste_passes_gradient_inside_the_clip_range_only(spec):
    w = weights()
    qt = quantize(w, spec)
    grad = np.asarray(jax.grad(lambda w: jnp.sum(fake_quant(w, spec)))(w))
    s = expand(qt.scale, spec, w.shape[0])
    zp = 0 if qt.zero_point is None else expand(qt.zero_point, spec, w.shape[0])
    r = np.round(np.asarray(w) / s + zp)
    inside = (r >= spec.qmin) & (r <= spec.qmax)
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(grad, inside.astype(np.float32))
    upstream = jax.random.normal(jax.random.key(3), w.shape)
    _, vjp = jax.vjp(lambda w: fake_quant(w, spec), w)
    np.testing.assert_array_equal(vjp(upstream)[0], np.where(inside, upstream, 0.0))


def test_ternary_and_binary_ste_is_the_identity():
    w = weights()
    for spec in (QuantSpec(scheme="ternary"), QuantSpec(scheme="binary")):
        grad = jax.grad(lambda w, spec=spec: fake_quant(w, spec).sum())(w)
        np.testing.assert_array_equal(grad, 1.0)


def test_one_group_is_per_channel():
    w = weights((16, 8))
    for scheme in ("symmetric", "asymmetric", "ternary"):
        bits = None if scheme == "ternary" else 4
        channel = QuantSpec(bits, scheme)
        group = QuantSpec(bits, scheme, "group", 16)
        np.testing.assert_array_equal(fake_quant(w, group), fake_quant(w, channel))
        np.testing.assert_array_equal(quantize(w, group).scale[0], quantize(w, channel).scale)


def test_mse_search_never_loses_to_absmax():
    w = weights((256, 4))  # Gaussian: at few bits, clipping the tails pays
    for bits in (2, 3):
        errs = [
            np.sum(np.square(np.asarray(fake_quant(w, QuantSpec(bits, scale_method=m)) - w)), 0)
            for m in ("absmax", "mse")
        ]
        assert np.all(errs[1] <= errs[0]) and np.any(errs[1] < errs[0])


def test_ternary_split_sums_exactly():
    w = weights((32, 8), seed=4)
    spec = QuantSpec(scheme="ternary")
    split = ternary_split(w, spec)
    halves = split.codes_a * split.scale + split.codes_b * split.scale
    np.testing.assert_array_equal(halves, fake_quant(w, spec))
    np.testing.assert_allclose(split.latent_a + split.latent_b, w, atol=1e-7)
    binary = QuantSpec(scheme="binary")
    for latent, codes in ((split.latent_a, split.codes_a), (split.latent_b, split.codes_b)):
        np.testing.assert_array_equal(quantize(latent, binary).codes, codes)
        np.testing.assert_allclose(
            quantize(latent, binary).scale, split.scale, rtol=1e-5, atol=1e-8
        )
    with pytest.raises(ValueError, match="scheme='ternary'"):
        ternary_split(w, QuantSpec(8))


def test_lsq_step_gradient_is_lsq():
    spec = QuantSpec(4, granularity="tensor", scale_method="lsq")
    w = weights()
    step = lsq_init(w, spec) * 2.0  # large enough that some weights clip, some do not
    upstream = jax.random.normal(jax.random.key(1), w.shape)
    g_w, g_s = jax.grad(lambda w, s: jnp.sum(lsq_fake_quant(w, s, spec) * upstream), (0, 1))(
        w, step
    )
    assert np.isfinite(g_s) and g_s != 0
    x = np.asarray(w) / np.asarray(step)
    clipped = np.clip(x, -7, 7)
    by_hand = np.where(x == clipped, np.round(clipped) - x, clipped)
    expected = np.sum(np.asarray(upstream) * by_hand) / np.sqrt(w.size * 7)
    np.testing.assert_allclose(g_s, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_w, np.where(x == clipped, upstream, 0.0), rtol=1e-6, atol=1e-7)
    # Forward: the uniform grid with the step as its scale.
    np.testing.assert_array_equal(lsq_fake_quant(w, step, spec), fake_quant(w, spec, step))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=9), "bits=9"),
        (dict(bits=1), "bits=1"),
        (dict(scheme="int"), "scheme='int'"),
        (dict(granularity="row"), "granularity='row'"),
        (dict(granularity="group"), "group_size=None"),
        (dict(group_size=4), "group_size=4"),
        (dict(granularity="group", group_size=0), "group_size=0"),
        (dict(scale_method="max"), "scale_method='max'"),
        (dict(scheme="ternary", bits=4), "ternary is 2 bit"),
        (dict(scheme="binary", scale_method="mse"), "does not apply to binary"),
        (dict(scheme="asymmetric", scale_method="lsq"), "lsq"),
        (dict(scheme="fp8", bits=4), "fp8 \\(e4m3\\) is 8 bits"),
        (dict(scheme="fp8", scale_method="lsq"), "lsq"),
        (dict(percentile=0.0), "percentile=0.0"),
        (dict(scale_method="mse", mse_grid=0), "mse_grid=0"),
    ],
)
def test_bad_specs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_bad_shapes_and_missing_steps_raise():
    with pytest.raises(ValueError, match="group_size 5 does not divide the 16 rows"):
        quantize(weights((16, 8)), QuantSpec(granularity="group", group_size=5))
    with pytest.raises(ValueError, match="scalar"):
        fake_quant(jnp.float32(1.0), QuantSpec())
    with pytest.raises(ValueError, match="learned step"):
        fake_quant(weights(), QuantSpec(scale_method="lsq"))
