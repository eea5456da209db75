"""FP8 (e4m3): the quantizer's definition and STE, packing, fp8_dense, a BERT run on fp8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxcompress import config as run_config
from jaxcompress.compress.quant import int8 as execution
from jaxcompress.compress.quant import method, qat
from jaxcompress.compress.quant import pack as quant_pack
from jaxcompress.compress.quant.activations import (
    QuantizedModel,
    calibrate,
    fake_quant_input_fp8,
    quantized_inputs,
)
from jaxcompress.compress.quant.quantizers import (
    QuantSpec,
    dequantize,
    fake_quant,
    fp8_round,
    quantize,
)
from jaxcompress.models import bert_rules
from jaxcompress.models.bert import Bert, Linear, init_params
from tests.helpers import batch_logits, tiny_config, token_batch

F32_U = np.finfo(np.float32).eps / 2


def spec_id(spec: QuantSpec) -> str:
    return f"{spec.scheme}-{spec.granularity}-{spec.scale_method}"


def weights(shape=(64, 24), seed=0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape) * 0.05


def test_fp8_quantizer_is_its_definition():
    w = np.asarray(weights())
    for granularity, axis in (("channel", 0), ("tensor", None)):
        spec = QuantSpec(scheme="fp8", granularity=granularity)
        scale = np.max(np.abs(w), axis=axis) * np.float32(1 / 448)
        expected = jnp.asarray(w / scale, jnp.float8_e4m3fn).astype(jnp.float32) * scale
        np.testing.assert_array_equal(fake_quant(w, spec), expected)
        qt = quantize(w, spec)
        assert qt.codes.dtype == jnp.float8_e4m3fn and qt.zero_point is None
        np.testing.assert_array_equal(qt.scale, scale)
        # ml_dtypes' own rounding (numpy, not XLA) gives the same codes.
        by_numpy = (w / scale).astype(jnp.float8_e4m3fn)
        np.testing.assert_array_equal(bits(qt.codes), by_numpy.view(np.uint8))
        assert float(np.max(np.abs(np.asarray(qt.codes, np.float32)))) == 448.0
        np.testing.assert_array_equal(dequantize(qt, spec), expected)
    np.testing.assert_array_equal(
        fp8_round(jnp.array([500.0, -1e4, 17.0, 0.3])), [448.0, -448.0, 16.0, 0.3125]
    )


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(scheme="fp8"),
        QuantSpec(scheme="fp8", granularity="tensor"),
        QuantSpec(scheme="fp8", granularity="group", group_size=16),
        QuantSpec(scheme="fp8", scale_method="mse"),
    ],
    ids=spec_id,
)
def test_fp8_round_trip_is_idempotent_and_jit_is_eager(spec):
    w = weights()
    qt = quantize(w, spec)
    wq = fake_quant(w, spec)
    np.testing.assert_array_equal(fake_quant(wq, spec, qt.scale), wq)  # a projection
    np.testing.assert_array_equal(
        np.asarray(quantize(wq, spec).codes, np.float32), np.asarray(qt.codes, np.float32)
    )
    np.testing.assert_allclose(fake_quant(wq, spec), wq, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(jax.jit(lambda w: fake_quant(w, spec))(w), wq)
    # e4m3 keeps 3 mantissa bits: the relative error of a normal value is <= 2^-4; below
    # 2^-6 (subnormals) the step is 2^-9, so the error is at most half of it.
    s = np.asarray(qt.scale)
    s = np.repeat(s, spec.group_size, axis=0) if s.ndim == 2 else np.broadcast_to(s, w.shape)
    err = np.abs(np.asarray(wq) - np.asarray(w))
    normal = np.abs(np.asarray(w)) / s >= 2.0**-6
    assert np.all(err[normal] <= np.abs(np.asarray(w))[normal] * 2.0**-4 * (1 + 1e-6))
    assert np.all(err[~normal] <= s[~normal] * 2.0**-10 * (1 + 1e-6))


def test_fp8_gradient_is_straight_through():
    spec = QuantSpec(scheme="fp8")
    w = weights()
    np.testing.assert_array_equal(jax.grad(lambda w: jnp.sum(fake_quant(w, spec)))(w), 1.0)
    # A given scale small enough to clip: the gradient stops where |w / s| > 448 + 16.
    scale = jnp.full((24,), 0.06 / 448)
    r = np.asarray(w) / np.asarray(scale)
    inside = np.abs(r) <= 464
    assert inside.any() and not inside.all()
    upstream = jax.random.normal(jax.random.key(3), w.shape)
    _, vjp = jax.vjp(lambda w: fake_quant(w, spec, scale), w)
    np.testing.assert_array_equal(vjp(upstream)[0], np.where(inside, upstream, 0.0))
    clipped = np.asarray(fake_quant(w, spec, scale))[~inside]
    np.testing.assert_allclose(np.abs(clipped), 0.06, rtol=1e-6)
    # QAT: the reparam fake-quantizes every kernel and passes gradients straight through.
    params = {"dense": {"kernel": w, "bias": jnp.ones(24)}}
    reparam = qat.qat(qat.default_rules(qat.FP8))
    seen = reparam.apply(params, reparam.init(params))
    np.testing.assert_array_equal(seen["dense"]["kernel"], fake_quant(w, spec))
    np.testing.assert_array_equal(seen["dense"]["bias"], params["dense"]["bias"])
    grads = jax.grad(lambda p: jnp.sum(reparam.apply(p, ())["dense"]["kernel"] ** 2))(params)
    np.testing.assert_array_equal(grads["dense"]["kernel"], 2 * seen["dense"]["kernel"])


def test_fp8_activation_fake_quant_and_its_gradient():
    x = jnp.array([-3.0, -1.0, 0.2, 0.4, 1.0, 1.02, 3.0])
    y = fake_quant_input_fp8(x, jnp.float32(1.0))
    s = np.float32(1.0) / np.float32(448)
    np.testing.assert_array_equal(y, fp8_round(x / s) * s)
    grad = jax.grad(lambda v: jnp.sum(fake_quant_input_fp8(v, jnp.float32(1.0))))(x)
    np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 1, 0])  # 1.02 rounds to 448 still
    with pytest.raises(ValueError, match="bits in 2..16 or 'fp8'"):
        with quantized_inputs([(".*", "fp16")]):
            pass


def test_fp8_shapes():
    conv = weights((3, 3, 4, 8))
    qt = quantize(conv, QuantSpec(scheme="fp8"))
    assert qt.codes.shape == conv.shape and qt.scale.shape == (8,)
    group = QuantSpec(scheme="fp8", granularity="group", group_size=12)
    assert quantize(conv, group).scale.shape == (3, 8)
    assert quantize(conv, QuantSpec(scheme="fp8", granularity="tensor")).scale.shape == ()
    assert fake_quant(conv.astype(jnp.bfloat16), QuantSpec(scheme="fp8")).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="scalar"):
        quantize(jnp.float32(1.0), QuantSpec(scheme="fp8"))
    with pytest.raises(ValueError, match="group_size 5 does not divide the 36 rows"):
        quantize(conv, QuantSpec(scheme="fp8", granularity="group", group_size=5))


def test_bad_fp8_specs_give_one_clear_line():
    with pytest.raises(ValueError, match=r"^QuantSpec.bits=4 but fp8 \(e4m3\) is 8 bits$"):
        QuantSpec(scheme="fp8", bits=4)
    assert qat.parse_spec("scheme='fp8'") == QuantSpec(scheme="fp8")
    with pytest.raises(ValueError, match="scheme='fp9'") as bad:
        qat.parse_spec("scheme='fp9'")
    assert "\n" not in str(bad.value) and "'fp8'" in str(bad.value)  # names what is allowed
    cfg = run_config.finetune_defaults()
    cfg.quantize.kernels = "scheme='fp8'"
    spec = method.parse(cfg.quantize)
    assert QuantSpec(scheme="fp8") in [s for _, s in spec.rules]
    cfg.quantize.kernels = "scheme='fp8',bits=4"
    with pytest.raises(run_config.ConfigValueError, match="^config key quantize.kernels: ") as e:
        method.parse(cfg.quantize)
    assert "\n" not in str(e.value) and "8 bits" in str(e.value)
    cfg.quantize.kernels = "scheme='fp8'"
    cfg.quantize.activation_scheme = "fp8"
    with pytest.raises(ValueError, match="activation_bits=8"):
        method.parse(cfg.quantize)
    cfg.quantize.activation_bits = 8
    assert method.parse(cfg.quantize).activation_scheme == "fp8"
    cfg.quantize.activation_scheme = "e5m2"
    with pytest.raises(run_config.ConfigValueError, match="activation_scheme='e5m2'"):
        run_config.validate(cfg)


def fp8_tolerance(x_fq: np.ndarray, w_fq: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Bound on |fp8 path - float reference|: both accumulate K products in float32 (the
    e4m3 products are exact), plus rescaling roundings; and an absolute part for CPUs whose
    float32 dot kernels order (or fuse) the accumulation differently."""
    k = x_fq.shape[-1]
    return 2 * (k + 4) * F32_U * (np.abs(x_fq) @ np.abs(w_fq)) + 4 * F32_U * np.abs(bias) + 1e-6


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(scheme="fp8"),
        QuantSpec(scheme="fp8", granularity="tensor"),
        QuantSpec(scheme="fp8", granularity="group", group_size=16),
    ],
    ids=spec_id,
)
@pytest.mark.parametrize("per_token", [True, False])
def test_fp8_dense_matches_fake_quantization(spec, per_token):
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    w = weights()
    bias = jax.random.normal(jax.random.key(3), (24,))
    weight = execution.fp8_weight(quantize(w, spec), spec)
    assert weight.codes.dtype == jnp.float8_e4m3fn
    y = np.asarray(execution.fp8_dense(x, weight, bias, per_token))
    ref = np.asarray(execution.fake_quant_dense(x, weight, bias, per_token))
    values, x_scale = execution.quantize_activations_fp8(x, per_token)
    assert values.dtype == jnp.float8_e4m3fn
    x_fq = np.asarray(values, np.float32) * np.asarray(x_scale)
    if not per_token:  # the activation QAT quantizer with the batch's own range
        np.testing.assert_array_equal(x_fq, fake_quant_input_fp8(x, jnp.max(jnp.abs(x))))
    w_fq = np.asarray(fake_quant(w, spec))
    tol = fp8_tolerance(x_fq, w_fq, np.asarray(bias))
    assert np.all(np.abs(y - ref) <= tol)
    assert np.all(np.abs(y - (x_fq @ w_fq + np.asarray(bias))) <= 2 * tol)
    # Close to the float layer: e4m3 operands carry ~2^-4 relative error each.
    exact = np.asarray(x @ w + bias)
    assert np.max(np.abs(y - exact)) < 0.05 * np.max(np.abs(exact))
    # The product runs on float8 operands, accumulated in float32.
    jaxpr = str(jax.make_jaxpr(lambda x: execution.fp8_dense(x, weight, bias, per_token))(x))
    assert "preferred_element_type=float32" in jaxpr and "f8_e4m3fn[" in jaxpr


def tree() -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "layer": {
            "dense": {"kernel": weights((16, 8), 1), "bias": jax.random.normal(keys[0], (8,))},
            "LayerNorm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
        },
        "classifier": {"kernel": jax.random.normal(keys[1], (8, 3)) * 0.05, "bias": jnp.zeros(3)},
    }


def bits(codes: jax.Array) -> np.ndarray:
    """The e4m3 bit patterns (compared as bytes: bit-exact, signed zeros included)."""
    return np.asarray(codes).view(np.uint8)


def test_fp8_weights_from_a_packed_file_and_from_kernels(tmp_path):
    p = tree()
    rules = [
        ("layer/.*/kernel", QuantSpec(scheme="fp8")),
        ("classifier/kernel", QuantSpec(8)),
        (".*", None),
    ]
    path = quant_pack.save(tmp_path / "fp8.safetensors", p, rules)
    tensors, meta = quant_pack.read(path)
    assert tensors["layer/dense/kernel:codes"].nbytes == 16 * 8  # one byte a value
    assert meta["quantized"]["layer/dense/kernel"]["spec"]["scheme"] == "fp8"
    fp8 = execution.fp8_weights(path)
    assert list(fp8) == ["layer/dense/kernel"]  # the int8 classifier is left out
    assert list(execution.int8_weights(path)) == ["classifier/kernel"]  # and vice versa
    kernel = p["layer"]["dense"]["kernel"]
    stored = fp8["layer/dense/kernel"]
    fresh = execution.fp8_weights({"layer/dense/kernel": kernel})["layer/dense/kernel"]
    qt = quantize(kernel, QuantSpec(scheme="fp8"))
    for codes in (fresh.codes, qt.codes):
        np.testing.assert_array_equal(bits(stored.codes), bits(codes))
    np.testing.assert_array_equal(stored.scale, qt.scale)
    np.testing.assert_array_equal(fresh.scale, qt.scale)
    loaded = quant_pack.load(path)["layer"]["dense"]["kernel"]
    np.testing.assert_array_equal(loaded, fake_quant(kernel, QuantSpec(scheme="fp8")))
    int8_from_kernels = execution.int8_weights({"layer/dense/kernel": kernel})
    assert int8_from_kernels["layer/dense/kernel"].codes.dtype == jnp.int8
    with pytest.raises(ValueError, match="layer/dense/kernel: fp8 execution needs scheme='fp8'"):
        execution.fp8_weights({"layer/dense/kernel": kernel}, QuantSpec(8))
    with pytest.raises(ValueError, match="2-D"):
        execution.fp8_weights({"conv/kernel": weights((3, 3, 4, 8))})
    with pytest.raises(ValueError, match="integer codes"):
        execution.int8_weight(quantize(kernel, QuantSpec(scheme="fp8")), QuantSpec(scheme="fp8"))


def test_bert_on_fp8_matches_fake_quantized_bert_and_stays_close_to_float(tmp_path):
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    rules = bert_rules.weight_rules(qat.FP8, None)
    packed = quant_pack.save(tmp_path / "fp8.safetensors", params, rules)
    weights = execution.fp8_weights(packed)
    assert len(weights) == 6 * 2 + 2  # every dense kernel of the tiny model
    flat = flatten_dict(params, sep="/")
    assert jax.tree.all(
        jax.tree.map(
            lambda a, b: bool(jnp.all(a == b)),
            execution.fp8_weights({path: flat[path] for path in weights}),
            weights,
        )
    )
    batch = token_batch(3)
    model = Bert(config)
    # The QAT view: fp8 weights and fp8 inputs (dynamic per-tensor ranges).
    fake = QuantizedModel(
        model, qat.qat(rules), activation_bits=8, layer_types=(Linear,), activation_scheme="fp8"
    )
    expected = batch_logits(fake, params, batch)
    fp8_model = execution.IntegerModel(model, weights, scheme="fp8")

    @jax.jit
    def fp8_logits(params, batch):
        return batch_logits(fp8_model, params, batch)

    got = fp8_logits(quant_pack.load(packed), batch)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    float_logits = batch_logits(model, params, batch)
    error = float(jnp.max(jnp.abs(got - float_logits)))
    assert 0 < error < 0.05 * float(jnp.max(jnp.abs(float_logits))) + 0.01
    hlo = jax.jit(fp8_logits).lower(params, batch).as_text()
    assert "f8e4m3fn" in hlo.lower()  # the matmuls take float8 operands
    int8 = execution.int8_weights({path: flat[path] for path in weights})
    with pytest.raises(ValueError, match="scheme='fp8' runs Fp8Weights; .* is an Int8Weight"):
        execution.IntegerModel(model, int8, scheme="fp8")
    with pytest.raises(ValueError, match="scheme='fp16'; expected one of"):
        execution.IntegerModel(model, weights, scheme="fp16")
    with pytest.raises(ValueError, match="activation_bits=4 but fp8"):
        QuantizedModel(model, qat.qat(rules), activation_bits=4, activation_scheme="fp8")


def test_static_ranges_run_the_calibrated_ptq_model_on_integers():
    """With calibrated ranges (the W8A8 post-training recipe's), the integer model is the
    fake-quantized model with the same ranges: no per-batch reduction over inputs. (The fp8
    scheme takes its static range through the same `_input_absmax`.)"""
    scheme = "int8"
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    spec = qat.INT8 if scheme == "int8" else qat.FP8
    rules = bert_rules.weight_rules(spec, None)
    model = Bert(config)
    calibration = [token_batch(s) for s in (1, 2)]
    ranges = calibrate(
        lambda b: model.apply({"params": params}, b["input_ids"], b["attention_mask"]),
        calibration,
        layer_types=(Linear,),
    )
    flat = flatten_dict(params, sep="/")
    kernels = {p: v for p, v in flat.items() if p.endswith("kernel") and v.ndim == 2}
    build = execution.int8_weights if scheme == "int8" else execution.fp8_weights
    weights = build(kernels)
    fake = QuantizedModel(
        model,
        qat.qat(rules),
        activation_bits=8,
        ranges=ranges,
        layer_types=(Linear,),
        activation_scheme="symmetric" if scheme == "int8" else "fp8",
    )
    batch = token_batch(3)  # not a calibration batch: some inputs clip at the calibrated range
    expected = jax.jit(lambda p: batch_logits(fake, p, batch))(params)
    integer = execution.IntegerModel(model, weights, scheme=scheme, ranges=ranges)
    got = jax.jit(lambda p: batch_logits(integer, p, batch))(params)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    dynamic_model = execution.IntegerModel(model, weights, scheme=scheme)
    dynamic = jax.jit(lambda p: batch_logits(dynamic_model, p, batch))(params)
    assert float(jnp.max(jnp.abs(dynamic - expected))) > 1e-4  # the ranges are in use

    def reductions(m) -> int:
        return str(jax.make_jaxpr(lambda p: batch_logits(m, p, batch))(params)).count("reduce_max")

    # no absmax of any layer input is computed (softmax's max remains)
    assert reductions(dynamic_model) - reductions(integer) == len(weights)
    missing = {k: v for k, v in ranges.items() if not k.endswith("query")}
    with pytest.raises(ValueError, match="no calibrated range for .*query"):
        batch_logits(
            execution.IntegerModel(model, weights, scheme=scheme, ranges=missing), params, batch
        )
