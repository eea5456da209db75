"""GOBO: centroids plus exact outliers, Lloyd with L1 stopping, bit-packed artefacts."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from jaxcompress import core
from jaxcompress.compress.quant import gobo
from jaxcompress.compress.quant.gobo import GoboSpec, gobo_dequantize, gobo_quantize
from jaxcompress.compress.quant.quantizers import QuantSpec, fake_quant
from jaxcompress.models import bert_rules


def gaussian(shape, seed=0, std=0.05) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * std).astype(np.float32)


def heavy_tailed(shape=(64, 48), seed=0) -> np.ndarray:
    """Gaussian weights plus a handful of large outliers, as in BERT's weight matrices."""
    w = gaussian(shape, seed)
    flat = w.reshape(-1)
    where = np.random.default_rng(seed + 1).choice(flat.size, 6, replace=False)
    flat[where] = np.array([1.0, -0.8, 0.9, -1.2, 0.7, 1.5], np.float32)
    return w


def tiny_params(seed=0) -> dict:
    return {
        "bert": {
            "embeddings": {"word_embeddings": gaussian((40, 16), seed, 0.02)},
            "encoder": {
                "layer": {
                    "0": {
                        "dense": {
                            "kernel": heavy_tailed((16, 24), seed),
                            "bias": np.ones(24, np.float32),
                        },
                        "LayerNorm": {"scale": np.ones(24, np.float32)},
                    }
                }
            },
        },
        "classifier": {"kernel": gaussian((24, 3), seed + 2), "bias": np.zeros(3, np.float32)},
    }


def non_outlier_values(t: gobo.GoboTensor) -> np.ndarray:
    w = np.asarray(gobo_dequantize(t)).reshape(-1)
    keep = np.ones(w.size, bool)
    keep[t.outlier_index] = False
    return w[keep]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exactly_two_to_the_bits_values_and_exact_outliers(bits):
    w = heavy_tailed((128, 96), seed=bits)
    t = gobo_quantize(w, GoboSpec(bits=bits))
    assert t.codes.dtype == np.uint8 and t.codes.shape == w.shape
    assert t.centroids.shape == (2**bits,) and t.bits == bits
    assert np.all(np.diff(t.centroids) > 0)
    assert len(np.unique(non_outlier_values(t))) == 2**bits
    dq = np.asarray(gobo_dequantize(t)).reshape(-1)
    assert t.outlier_index.dtype == np.int32 and t.outlier_value.dtype == np.float32
    np.testing.assert_array_equal(dq[t.outlier_index], w.reshape(-1)[t.outlier_index])
    planted = np.flatnonzero(np.abs(w.reshape(-1)) >= 0.7)
    assert set(planted) <= set(t.outlier_index.tolist())


def test_outlier_fraction_on_gaussian_data_is_gobo_target():
    w = gaussian((400, 500), seed=3)
    t = gobo_quantize(w, GoboSpec(bits=3, iterations=2))
    fraction = t.outlier_index.size / w.size
    assert 0.0007 < fraction < 0.0013  # target 0.1%; binomial std about 0.00006
    none = gobo_quantize(w[:50], GoboSpec(bits=3, outlier_sigma=np.inf))
    assert none.outlier_index.size == 0


def test_beats_uniform_absmax_on_heavy_tailed_weights():
    w = heavy_tailed()
    uniform = np.asarray(fake_quant(jnp.asarray(w), QuantSpec(3, granularity="tensor")))
    goboed = np.asarray(gobo_dequantize(gobo_quantize(w, GoboSpec(bits=3))))
    mse_uniform = np.mean((uniform - w) ** 2)
    mse_gobo = np.mean((goboed - w) ** 2)
    assert mse_gobo < 0.1 * mse_uniform


def test_lloyd_never_increases_the_error():
    w = gaussian((64, 64), seed=5).reshape(-1)
    for init in gobo.INITS:
        c0 = gobo.initial_centroids(w, 3, init)
        fit = gobo.lloyd(w, c0, 50)
        assert all(b < a for a, b in zip(fit.errors, fit.errors[1:], strict=False))
        assert len(fit.errors) > 1  # the initial centroids are improved on
        # More allowed iterations never give a worse result.
        errors = [gobo.lloyd(w, c0, n).errors[-1] for n in range(8)]
        assert all(b <= a for a, b in zip(errors, errors[1:], strict=False))
    # One raw Lloyd step never increases the squared error (k-means' guarantee).
    x = w.astype(np.float64)
    c = gobo.initial_centroids(w, 3).astype(np.float64)
    for _ in range(5):
        codes = gobo.assign(x, c)
        before = np.sum((x - c[codes]) ** 2)
        c = gobo.lloyd_step(x, c.astype(np.float32), codes).astype(np.float64)
        after = np.sum((x - c[gobo.assign(x, c)]) ** 2)
        assert after <= before * (1 + 1e-9)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_codes_round_trip_at_exact_width(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 13, 64):
        u = rng.integers(0, 2**bits, count).astype(np.uint8)
        packed = gobo.pack_codes(u, bits)
        assert packed.size == -(-count * bits // 8)
        np.testing.assert_array_equal(gobo.unpack_codes(packed, bits, count), u)


def test_rules_select_kernels_only():
    params = tiny_params()
    out, quantized = gobo.gobo(params, gobo.default_rules())
    assert sorted(quantized) == ["bert/encoder/layer/0/dense/kernel", "classifier/kernel"]
    np.testing.assert_array_equal(out["classifier"]["bias"], params["classifier"]["bias"])
    np.testing.assert_array_equal(
        out["bert"]["embeddings"]["word_embeddings"],
        params["bert"]["embeddings"]["word_embeddings"],
    )
    for path, t in quantized.items():
        leaf = out
        for key in path.split("/"):
            leaf = leaf[key]
        np.testing.assert_array_equal(leaf, gobo_dequantize(t))
    _, with_embeddings = gobo.gobo(params, bert_rules.weight_rules(gobo.GOBO3, GoboSpec(bits=4)))
    assert "bert/embeddings/word_embeddings" in with_embeddings
    with pytest.raises(ValueError, match="expected a GoboSpec"):
        gobo.gobo(params, [(".*", QuantSpec(bits=3))])
    with pytest.raises(ValueError, match="selected no parameter"):
        gobo.gobo(params, [("nothing/.*", GoboSpec()), (".*", None)])


def flat(tree) -> dict:
    return {core.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_save_load_is_bit_exact(tmp_path):
    params = tiny_params()
    out, quantized = gobo.gobo(params, bert_rules.weight_rules(gobo.GOBO3, GoboSpec(bits=5)))
    loaded, loaded_q = gobo.gobo_load(gobo.gobo_save(tmp_path / "m.safetensors", out, quantized))
    a, b = flat(out), flat(loaded)
    assert sorted(a) == sorted(b)
    for path in a:
        assert a[path].dtype == b[path].dtype
        np.testing.assert_array_equal(a[path], b[path])
    for path, t in quantized.items():
        for x, y in zip(t, loaded_q[path], strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def data_bytes(path) -> int:
    """Bytes of a safetensors file's tensor data (the file less its JSON header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize("bits", [3, 5])
def test_file_bytes_are_codes_outliers_and_centroids(tmp_path, bits):
    w = heavy_tailed((96, 80))
    t = gobo_quantize(w, GoboSpec(bits=bits))
    path = gobo.gobo_save(tmp_path / "w.safetensors", {"w": w}, {"w": t})
    n = t.outlier_index.size
    assert 6 <= n < 0.005 * w.size
    assert data_bytes(path) == -(-w.size * bits // 8) + 8 * n + 4 * 2**bits
    sizes = gobo.gobo_packed_bytes({"w": w}, {"w": t})
    assert sizes["bytes"] == path.stat().st_size == sizes["bytes_no_embeddings"]


def test_packed_bytes_without_embeddings(tmp_path):
    params = tiny_params()
    out, quantized = gobo.gobo(params, bert_rules.weight_rules(gobo.GOBO3, GoboSpec(bits=4)))
    sizes = gobo.gobo_packed_bytes(out, quantized)
    table = quantized["bert/embeddings/word_embeddings"]
    table_bytes = 40 * 16 * 4 // 8 + 8 * table.outlier_index.size + 4 * 16
    assert sizes["bytes"] - sizes["bytes_no_embeddings"] >= table_bytes
    path = gobo.gobo_save(tmp_path / "m.safetensors", out, quantized)
    assert path.stat().st_size == sizes["bytes"]
    with safe_open(path, framework="np") as f:
        meta = json.loads(f.metadata()[gobo.META_KEY])
    assert meta["gobo"]["classifier/kernel"]["bits"] == 3


def test_bad_input_raises():
    for bad in (dict(bits=1), dict(bits=9), dict(outlier_sigma=0.0), dict(iterations=-1)):
        with pytest.raises(ValueError, match="GoboSpec"):
            GoboSpec(**bad)
    with pytest.raises(ValueError, match="GoboSpec.init"):
        GoboSpec(init="kmeans++")
    with pytest.raises(ValueError, match="empty"):
        gobo_quantize(np.zeros((0, 3), np.float32), GoboSpec())
    with pytest.raises(ValueError, match="not leaves"):
        gobo.gobo_pack({"w": np.ones(3)}, {"v": gobo_quantize(np.ones(3), GoboSpec())})


def test_constant_and_tiny_arrays():
    t = gobo_quantize(np.full((4, 4), 0.25, np.float32), GoboSpec(bits=2))
    np.testing.assert_array_equal(gobo_dequantize(t), np.full((4, 4), 0.25, np.float32))
    w = gaussian((3,), seed=7)
    t = gobo_quantize(w, GoboSpec(bits=8))  # fewer values than centroids: each is exact
    np.testing.assert_array_equal(gobo_dequantize(t), w)
