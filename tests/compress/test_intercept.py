"""Interception by module path: low-rank factors, quantized inputs, foreign linen/nnx models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.errors import ScopeParamNotFoundError

from jaxcompress.compress.factorize import LowRank, densify, low_rank_params, svd_factors
from jaxcompress.compress.intercept import LowRankLinear, intercept, low_rank_layers, use_low_rank
from jaxcompress.compress.quant.activations import calibrate, fake_quant_input, quantized_inputs


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


class Block(nn.Module):
    """A pre-norm Transformer block: DenseGeneral attention, a Dense MLP, an Einsum head."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)
        h = nn.relu(nn.Dense(32, name="up")(nn.LayerNorm()(x)))
        x = x + nn.Dense(32, name="down")(h)
        return nn.Einsum((32, 4), "bld,dc->blc", name="head")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs)])
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.out(x)


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def _absmax(x):
    return jnp.max(jnp.abs(x))


X_MLP = jax.random.normal(jax.random.key(1), (8, 16))
X_CNN = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
X_SEQ = jax.random.normal(jax.random.key(3), (2, 6, 32))


def _linen(model, x):
    """Params, `apply(params, x)` and its jitted float reference (traced outside contexts)."""
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]

    def apply(p, x):
        return model.apply({"params": p}, x)

    return params, apply, jax.jit(apply)


def test_linen_mlp_runs_low_rank_factors_with_fewer_flops():
    params, apply, reference = _linen(MLP(), X_MLP)
    factored, ranks = low_rank_params(params, [("Dense_[01]/kernel", LowRank(rank=4))])
    assert ranks == {"Dense_0": 4, "Dense_1": 4}
    with pytest.raises(ScopeParamNotFoundError):  # what a foreign model does with factors
        apply(factored, X_MLP)

    def low_rank_apply(p, x):
        with low_rank_layers():
            return apply(p, x)

    got = jax.jit(low_rank_apply)(factored, X_MLP)
    np.testing.assert_allclose(got, reference(densify(factored), X_MLP), rtol=0, atol=1e-5)
    dense, low = _flops(apply, params, X_MLP), _flops(low_rank_apply, factored, X_MLP)
    # 8 rows x (16x32 + 32x32 + 32x4) MACs dense; the factors cost (16+32)*4 and (32+32)*4.
    assert low < dense - 2 * 8 * (16 * 32 + 32 * 32 - 48 * 4 - 64 * 4) + 1

    def quantized_low_rank_apply(p, x):
        with quantized_inputs([("Dense_0", 2), (".*", None)]), low_rank_layers():
            return apply(p, x)

    x0 = fake_quant_input(X_MLP, 2, _absmax(X_MLP))
    got = jax.jit(quantized_low_rank_apply)(factored, X_MLP)
    np.testing.assert_allclose(got, reference(densify(factored), x0), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"rule 'Dense_9' .* \['Dense_1', 'Dense_0'\]"):
        with low_rank_layers([("Dense_[01]", True), ("Dense_9", True)]):
            apply(factored, X_MLP)


def test_linen_transformer_runs_low_rank_dense_general_attention():
    params, apply, reference = _linen(Block(), X_SEQ)
    attention = ("query", "key", "value", "out")
    shapes = {name: params["attn"][name]["kernel"].shape for name in attention}
    assert shapes["query"] == (32, 2, 16) and shapes["out"] == (2, 16, 32)
    # DenseGeneral factors are 2-D over (contracted input axes, features): flatten first.
    flat = {
        **params,
        "attn": {
            name: {**params["attn"][name], "kernel": params["attn"][name]["kernel"].reshape(32, 32)}
            for name in attention
        },
    }
    rules = [
        ("attn/.*/kernel", LowRank(rank=4)),
        ("up/kernel", LowRank(rank=8)),
        ("head/kernel", LowRank(rank=2)),
    ]
    factored, ranks = low_rank_params(flat, rules)
    assert sorted(ranks) == ["attn/key", "attn/out", "attn/query", "attn/value", "head", "up"]
    dense = densify(factored)
    dense["attn"] = {
        name: {**dense["attn"][name], "kernel": dense["attn"][name]["kernel"].reshape(shapes[name])}
        for name in attention
    }

    def low_rank_apply(p, x):
        with low_rank_layers([("attn/.*", True), ("up|head", True)]):
            return apply(p, x)

    got = jax.jit(low_rank_apply)(factored, X_SEQ)
    np.testing.assert_allclose(got, reference(dense, X_SEQ), rtol=0, atol=1e-5)
    # 2 flops per MAC, 12 tokens: 4 attention projections, the MLP's up and the Einsum head.
    saved = 2 * 12 * (4 * (32 * 32 - 64 * 4) + 32 * 32 - 64 * 8 + 32 * 4 - 36 * 2)
    assert _flops(low_rank_apply, factored, X_SEQ) <= _flops(apply, params, X_SEQ) - saved + 1


def test_low_rank_conv_refuses_clearly():
    model = CNN()
    params = jax.eval_shape(model.init, jax.random.key(0), X_CNN)["params"]  # shapes only
    layer = {"kernel_a": jnp.ones((72, 2)), "kernel_b": jnp.ones((2, 8))}
    factored = {**params, "Conv_1": {**layer, "bias": params["Conv_1"]["bias"]}}
    with pytest.raises(ValueError, match="Conv Conv_1 holds kernel_a/kernel_b.*densify"):
        with low_rank_layers():
            jax.eval_shape(lambda p, x: model.apply({"params": p}, x), factored, X_CNN)


def test_nnx_mlp_runs_low_rank_factors_with_fewer_flops():
    model = NnxMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    dense_flops = _flops(lambda s, x: nnx.merge(graphdef, s)(x), state, X_MLP)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    factored = jax.tree.map(lambda v: v, params)  # low_rank_params' format, built by hand
    dense = jax.tree.map(lambda v: v, params)
    for i, layer in factored["layers"].items():
        layer["kernel_a"], layer["kernel_b"] = svd_factors(layer.pop("kernel"), 4)
        dense["layers"][i]["kernel"] = layer["kernel_a"] @ layer["kernel_b"]
    reference = nnx.clone(model)
    nnx.update(reference, dense)

    use_low_rank(model, factored)
    assert isinstance(model.layers[0], LowRankLinear) and not hasattr(model.layers[0], "kernel")
    assert model.layers[0].kernel_a[...].shape == (16, 4)
    got = nnx.jit(lambda m, x: m(x))(model, X_MLP)
    np.testing.assert_allclose(got, reference(X_MLP), rtol=0, atol=1e-5)
    graphdef, state = nnx.split(model)
    low_flops = _flops(lambda s, x: nnx.merge(graphdef, s)(x), state, X_MLP)
    assert low_flops < dense_flops - 2 * 8 * (16 * 32 + 32 * 32 - 48 * 4 - 64 * 4) + 1
    factors = {"kernel_a": jnp.ones((1, 1)), "kernel_b": jnp.ones((1, 1))}
    with pytest.raises(ValueError, match="layers holds kernel_a/kernel_b but is List; only"):
        use_low_rank(model, {"layers": factors})
    with pytest.raises(ValueError, match="head holds kernel_a/kernel_b but is no module"):
        use_low_rank(model, {"head": factors})


def test_linen_mlp_quantized_inputs_match_a_hand_computed_fake_quant():
    params, apply, reference = _linen(MLP(), X_MLP)
    x2 = 3.0 * jax.random.normal(jax.random.key(4), (8, 16))

    def run(rules, ranges=None):
        def quantized(p, x):
            with quantized_inputs(rules, ranges):
                return apply(p, x)

        return jax.jit(quantized)(params, X_MLP)

    float_out = reference(params, X_MLP)
    first = run([("Dense_0", 2), (".*", None)])
    expected = reference(params, fake_quant_input(X_MLP, 2, _absmax(X_MLP)))
    np.testing.assert_allclose(first, expected, rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(first - float_out))) > 1e-2
    close = run([(".*", 16)])
    np.testing.assert_allclose(close, float_out, rtol=0, atol=1e-3)

    ranges = calibrate(lambda x: apply(params, x), [X_MLP, x2])
    assert sorted(ranges) == ["Dense_0", "Dense_1", "Dense_2"]
    np.testing.assert_allclose(ranges["Dense_0"], _absmax(x2), rtol=0, atol=1e-6)
    calibrated = run([("Dense_0", 2), (".*", None)], ranges)
    expected = reference(params, fake_quant_input(X_MLP, 2, _absmax(x2)))
    np.testing.assert_allclose(calibrated, expected, rtol=0, atol=1e-6)


def test_linen_cnn_and_transformer_quantize_conv_dense_general_and_einsum_inputs():
    for model, x, layers in (
        (CNN(), X_CNN, ["Conv_0", "Conv_1", "Dense_0"]),
        (
            Block(),
            X_SEQ,
            ["attn/key", "attn/out", "attn/query", "attn/value", "down", "head", "up"],
        ),
    ):
        params, apply, reference = _linen(model, x)
        ranges = calibrate(lambda x, apply=apply, params=params: apply(params, x), [x])
        assert sorted(ranges) == layers and all(float(v) > 0 for v in ranges.values())

        def quantized(p, x, apply=apply, ranges=ranges):
            with quantized_inputs([(".*", 2)], ranges):
                low = apply(p, x)
            with quantized_inputs([(".*", 16)]):
                return low, apply(p, x)

        low, high = jax.jit(quantized)(params, x)
        float_out = reference(params, x)
        assert float(jnp.max(jnp.abs(low - float_out))) > 1e-2
        np.testing.assert_allclose(high, float_out, rtol=0, atol=1e-3)


def test_nnx_model_quantized_inputs_and_calibration():
    model = NnxMLP(nnx.Rngs(0))
    float_out = model(X_MLP)
    step = nnx.jit(lambda m, x: m(x))
    with quantized_inputs([("layers/0", 2), (".*", None)], model=model):
        first = step(model, X_MLP)
    with quantized_inputs([(".*", 16)], model=model):
        close = step(model, X_MLP)
    assert type(model.layers[0]) is nnx.Linear  # the context leaves the model as it was
    reference = NnxMLP(nnx.Rngs(0))
    x0 = fake_quant_input(X_MLP, 2, _absmax(X_MLP))
    np.testing.assert_allclose(first, reference(x0), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(first - float_out))) > 1e-2
    np.testing.assert_allclose(close, float_out, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(step(model, X_MLP), float_out)

    ranges = calibrate(lambda x: model(x), [X_MLP], model=model)
    assert sorted(ranges) == ["layers/0", "layers/1", "out"]
    np.testing.assert_allclose(ranges["layers/0"], _absmax(X_MLP), rtol=0, atol=1e-6)


def test_rules_that_intercept_nothing_raise():
    params, apply, reference = _linen(MLP(), X_MLP)
    with pytest.raises(ValueError, match=r"rule 'dense_0' .*nearest paths seen: \['Dense_0'"):
        with quantized_inputs([("dense_0", 8)]):
            apply(params, X_MLP)
    with pytest.raises(ValueError, match="no layer was called inside the context"):
        with quantized_inputs([(".*", 8)]):
            pass
    with pytest.raises(ValueError, match="rule 'Dense_0' needs bits in 2..16"):
        quantized_inputs([("Dense_0", 1)]).__enter__()
    with pytest.raises(ValueError, match="no calibrated range for layer Dense_2"):
        with quantized_inputs([(".*", 8)], {"Dense_0": 1.0, "Dense_1": 1.0}):
            apply(params, X_MLP)
    model = NnxMLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rule 'layers/2' .*\['layers/1', 'layers/0', 'out'\]"):
        with quantized_inputs([("layers/2", 8)], model=model):
            model(X_MLP)
    assert type(model.layers[0]) is nnx.Linear
    with pytest.raises(ValueError, match="no selected layer of the nnx model was called"):
        with intercept([(".*", 8)], lambda layer, call, a, k: call(*a, **k), model=model):
            pass
