"""Packed quantized artefacts round trip bit-exactly; integer Dense matches fake quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.compress.quant import pack as quant_pack
from jaxcompress.compress.quant.int8 import (
    fake_quant_dense,
    int8_dense,
    int8_weight,
    int8_weights,
    quantize_activations,
)
from jaxcompress.compress.quant.qat import SPLIT_SUFFIX, add_binary_split, add_lsq_steps, qat
from jaxcompress.compress.quant.quantizers import QuantSpec, fake_quant, quantize
from jaxcompress.models import artefact


def spec_id(spec: QuantSpec) -> str:
    return f"{spec.scheme}{spec.bits}-{spec.granularity}-{spec.scale_method}"


def params() -> dict:
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "bert": {
            "embeddings": {"word_embeddings": jax.random.normal(keys[0], (40, 16)) * 0.02},
            "layer": {
                "dense": {
                    "kernel": jax.random.normal(keys[1], (16, 8)) * 0.05,
                    "bias": jax.random.normal(keys[2], (8,)),
                },
                "LayerNorm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
            },
        },
        "classifier": {"kernel": jax.random.normal(keys[3], (8, 3)) * 0.05, "bias": jnp.zeros(3)},
    }


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_pack_bits_round_trip(width):
    rng = np.random.default_rng(width)
    for count in (0, 1, 7, 13, 64):
        u = rng.integers(0, 2**width, count).astype(np.uint8)
        packed = quant_pack.pack_bits(u, width)
        assert packed.size == -(-count * width // 8)
        np.testing.assert_array_equal(quant_pack.unpack_bits(packed, width, count), u)


SPECS = [
    *(QuantSpec(b) for b in range(2, 9)),
    *(QuantSpec(b, "asymmetric", "group", 4, "percentile", 95.0) for b in range(2, 9)),
    QuantSpec(3, "asymmetric", "tensor", scale_method="mse"),
    QuantSpec(scheme="ternary"),
    QuantSpec(scheme="binary", granularity="tensor"),
    QuantSpec(4, scale_method="lsq"),
    QuantSpec(scheme="fp8"),
    QuantSpec(scheme="fp8", granularity="group", group_size=4, scale_method="mse"),
]


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_save_load_is_bit_exact(spec, tmp_path):
    rules = [
        (".*/kernel", spec),
        ("bert/embeddings/.*", QuantSpec(8, granularity="tensor")),
        (".*", None),
    ]
    p = add_lsq_steps(params(), rules)
    reparam = qat(rules)
    expected = jax.jit(reparam.apply)(p, reparam.init(p))
    path = quant_pack.save(tmp_path / "q.safetensors", p, rules)
    loaded = quant_pack.load(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    tensors, meta = quant_pack.read(path)
    kernel = p["bert"]["layer"]["dense"]["kernel"]
    width = quant_pack.container_bits(spec)
    assert width == {1: 1, 2: 2, 3: 4, 4: 4}.get(spec.bits, 8)
    assert tensors["bert/layer/dense/kernel:codes"].nbytes == kernel.size * width // 8
    assert meta["quantized"]["bert/layer/dense/kernel"]["spec"]["bits"] == spec.bits
    _, codes = quant_pack.unpack((tensors, meta))
    step = p["bert"]["layer"]["dense"].get("kernel@lsq_step")
    qt, spec_back = codes["bert/layer/dense/kernel"]
    assert spec_back == spec
    np.testing.assert_array_equal(qt.codes, quantize(kernel, spec, step).codes)


def test_packed_bytes_shrink_with_bits(tmp_path):
    p = params()
    p["bert"]["layer"]["dense"]["kernel"] = jax.random.normal(jax.random.key(9), (128, 64))
    p["bert"]["layer"]["dense"]["bias"] = jnp.zeros(64)
    p["classifier"]["kernel"] = jnp.ones((64, 3))
    sizes = {}
    for bits in (8, 4, 2):
        rules = [(".*/kernel|.*_embeddings", QuantSpec(bits)), (".*", None)]
        sizes[bits] = quant_pack.packed_bytes(p, rules)
        assert sizes[bits]["bytes_no_embeddings"] < sizes[bits]["bytes"]
    floats = artefact.saved_bytes(p)
    assert floats["bytes"] > sizes[8]["bytes"] > sizes[4]["bytes"] > sizes[2]["bytes"]
    assert floats["bytes_no_embeddings"] > sizes[8]["bytes_no_embeddings"]
    # 40 x 16 word embeddings = 640 codes: 640, 320 or 160 bytes (header padding: < 8 bytes).
    embedding = {b: s["bytes"] - s["bytes_no_embeddings"] for b, s in sizes.items()}
    assert abs(embedding[8] - embedding[4] - 320) < 8
    assert abs(embedding[4] - embedding[2] - 160) < 8


def test_read_rejects_plain_safetensors(tmp_path):
    artefact_dir = tmp_path / "plain.safetensors"
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2, np.float32)}, artefact_dir)
    with pytest.raises(ValueError, match="not a packed quantized artefact"):
        quant_pack.read(artefact_dir)


def tolerance(x_fq: np.ndarray, w_fq: np.ndarray) -> np.ndarray:
    """Bound on |int path - float path|: the float32 matmul's accumulation error over K terms
    (plus operand rounding), the integer path's two rescaling roundings."""
    k = x_fq.shape[-1]
    u = np.finfo(np.float32).eps / 2
    return (k + 4) * u * (np.abs(x_fq) @ np.abs(w_fq))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(8),
        QuantSpec(8, granularity="tensor"),
        QuantSpec(8, granularity="group", group_size=16),
        QuantSpec(4),
        QuantSpec(scheme="ternary"),
    ],
    ids=spec_id,
)
@pytest.mark.parametrize("per_token", [True, False])
def test_int8_dense_matches_fake_quantization(spec, per_token):
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    w = jax.random.normal(jax.random.key(2), (64, 24)) * 0.05
    bias = jax.random.normal(jax.random.key(3), (24,))
    weight = int8_weight(quantize(w, spec), spec)
    y = np.asarray(int8_dense(x, weight, bias, per_token))
    ref = np.asarray(fake_quant_dense(x, weight, bias, per_token))
    x_codes, x_scale = quantize_activations(x, per_token)
    x_fq = np.asarray(x_codes, np.float32) * np.asarray(x_scale)
    w_fq = np.asarray(fake_quant(w, spec))
    np.testing.assert_array_equal(np.asarray(weight.codes, np.float32), quantize(w, spec).codes)
    tol = tolerance(x_fq, w_fq) + 2 * np.finfo(np.float32).eps * np.abs(bias)
    assert np.all(np.abs(y - ref) <= tol)
    assert np.all(np.abs(y - (x_fq @ w_fq + np.asarray(bias))) <= 2 * tol + 1e-7)
    # The product itself runs on int8 operands with int32 accumulation.
    jaxpr = str(jax.make_jaxpr(lambda x: int8_dense(x, weight, bias, per_token))(x))
    assert "preferred_element_type=int32" in jaxpr and "i8[" in jaxpr


def test_int8_weights_from_a_packed_file(tmp_path):
    p = params()
    rules = [
        ("bert/layer/.*/kernel", QuantSpec(8)),
        ("classifier/kernel", QuantSpec(4, "asymmetric")),
        (".*", None),
    ]
    path = quant_pack.save(tmp_path / "q.safetensors", p, rules)
    weights = int8_weights(path)
    assert list(weights) == ["bert/layer/dense/kernel"]  # asymmetric is left out
    kernel = p["bert"]["layer"]["dense"]["kernel"]
    w = weights["bert/layer/dense/kernel"]
    assert w.codes.dtype == jnp.int8 and w.scale.shape == (8,)
    x = jax.random.normal(jax.random.key(5), (3, 16))
    float_dense = x @ quant_pack.load(path)["bert"]["layer"]["dense"]["kernel"]
    np.testing.assert_allclose(int8_dense(x, w), float_dense, atol=0.02 * np.abs(float_dense).max())
    np.testing.assert_array_equal(w.codes, quantize(kernel, QuantSpec(8)).codes)
    with pytest.raises(ValueError, match="symmetric"):
        int8_weight(quantize(kernel, QuantSpec(8, "asymmetric")), QuantSpec(8, "asymmetric"))


def test_binary_split_starts_at_the_ternary_model_and_packs_both_halves(tmp_path):
    binary = QuantSpec(scheme="binary")
    rules = [(r".*/kernel", binary), (".*", None)]
    tree = params()
    split = add_binary_split(tree, rules)
    kernel = tree["bert"]["layer"]["dense"]["kernel"]
    halves = split["bert"]["layer"]["dense"]
    np.testing.assert_allclose(
        halves["kernel"] + halves["kernel" + SPLIT_SUFFIX], kernel, atol=1e-7
    )
    seen = qat(rules).apply(split, ())
    assert "kernel" + SPLIT_SUFFIX not in seen["bert"]["layer"]["dense"]
    ternary = fake_quant(kernel, QuantSpec(scheme="ternary"))
    np.testing.assert_allclose(seen["bert"]["layer"]["dense"]["kernel"], ternary, atol=1e-7)
    np.testing.assert_array_equal(seen["bert"]["layer"]["dense"]["bias"], halves["bias"])

    # Both halves train: each gets its own straight-through gradient.
    def loss(p):
        return jnp.sum(qat(rules).apply(p, ())["classifier"]["kernel"] ** 2)

    grads = jax.grad(loss)(split)["classifier"]
    assert np.any(grads["kernel"] != 0) and np.any(grads["kernel" + SPLIT_SUFFIX] != 0)

    path = quant_pack.save(tmp_path / "split.safetensors", split, rules)
    loaded = quant_pack.load(path)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(seen), strict=True):
        np.testing.assert_array_equal(got, want)
    # Two 1-bit halves: the 16x8 kernel costs 2 x 16 bytes of codes.
    assert quant_pack.read(path).tensors["bert/layer/dense/kernel:codes"].nbytes == 16
    with pytest.raises(ValueError, match="already split"):
        add_binary_split(split, rules)
    with pytest.raises(ValueError, match="scheme='binary'"):
        add_binary_split(tree, [(r".*/kernel", QuantSpec(8)), (".*", None)])
