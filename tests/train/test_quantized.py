"""Quantization-aware training: the quantized model view, calibration, the train loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from jaxcompress import core
from jaxcompress.compress.quant import int8 as int8_exec
from jaxcompress.compress.quant import pack as quant_pack
from jaxcompress.compress.quant import qat
from jaxcompress.compress.quant.activations import QuantizedModel, calibrate, fake_quant_input
from jaxcompress.compress.quant.quantizers import QuantSpec
from jaxcompress.experiments import recipes
from jaxcompress.models import bert_rules
from jaxcompress.models.bert import Bert, Linear, init_params
from jaxcompress.train.loop import train
from tests.helpers import (
    batch_logits,
    save_tiny_model,
    tiny_config,
    tiny_model_run_config,
    tiny_run_config,
    token_batch,
)


def calibrate_bert(model, params, batches):
    """`calibrate` of BERT's own dense layers, its params kept as jit arguments."""
    logits = jax.jit(lambda p, batch: batch_logits(model, p, batch))  # traced in the context
    return calibrate(lambda b: logits(params, b), batches, layer_types=(Linear,), jit=False)


def test_fake_quant_input_grid_and_straight_through():
    x = jnp.array([-3.0, -1.0, 0.2, 0.4, 1.0, 3.0])
    y = fake_quant_input(x, bits=4, absmax=jnp.float32(1.0))  # 7 steps of 1/7 per side
    np.testing.assert_allclose(y, jnp.clip(jnp.round(x * 7), -7, 7) / 7, rtol=0, atol=1e-7)
    grad = jax.grad(lambda v: jnp.sum(fake_quant_input(v, 4, jnp.float32(1.0))))(x)
    np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 0])


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True])
def test_calibrated_ranges_cover_every_dense_layer(shared):
    changes = {"attention_groups": (0, 0), "ffn_groups": (0, 0)} if shared else {}
    config = tiny_config(num_labels=2, **changes)
    params = init_params(config, jax.random.key(0))
    model = Bert(config)
    batches = [token_batch(0), token_batch(1)]
    ranges = calibrate_bert(model, params, batches)
    # q, k, v, attention output, intermediate, output per stored layer; pooler; classifier.
    stored_layers = 1 if shared else 2
    assert len(ranges) == 6 * stored_layers + 2
    assert all(float(v) > 0 for v in ranges.values())
    assert calibrate_bert(model, params, batches) == ranges  # deterministic
    first = calibrate_bert(model, params, batches[:1])
    assert all(float(first[k]) <= float(ranges[k]) for k in ranges)  # a max over batches

    float_logits = batch_logits(model, params, batches[0])
    for bits, tolerance in ((8, 0.05), (4, 1.0)):
        q = QuantizedModel(
            model, core.identity(), activation_bits=bits, ranges=ranges, layer_types=(Linear,)
        )
        error = float(jnp.max(jnp.abs(batch_logits(q, params, batches[0]) - float_logits)))
        assert 0 < error < tolerance
    dynamic = QuantizedModel(model, core.identity(), activation_bits=8, layer_types=(Linear,))
    assert float(jnp.max(jnp.abs(batch_logits(dynamic, params, batches[0]) - float_logits))) < 0.05


def test_quantized_model_quantizes_weights_but_not_projections():
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    projections = {"hidden": {"kernel": jnp.full((32, 32), 0.123456)}}
    q = QuantizedModel(Bert(config), qat.qat(qat.default_rules(QuantSpec(bits=2))))
    seen = q.quantized_params({**params, "distill": projections})
    assert seen["distill"] is projections
    kernel = flatten_dict(seen, sep="/")["bert/encoder/layer/0/intermediate/dense/kernel"]
    assert all(len(np.unique(np.asarray(kernel)[:, c])) <= 3 for c in range(kernel.shape[1]))


def test_bad_quantization_specs_fail_clearly():
    assert qat.parse_spec("") is None
    assert qat.parse_spec("bits=4,granularity='group',group_size=8") == QuantSpec(
        bits=4, granularity="group", group_size=8
    )
    with pytest.raises(ValueError, match="key=value pairs only"):
        qat.parse_spec("4")
    with pytest.raises(ValueError, match="unexpected keyword argument 'bit'"):
        qat.parse_spec("bit=4")
    with pytest.raises(ValueError, match=r"bits=9"):
        qat.parse_spec("bits=9")


@pytest.mark.slow
def test_w8a8_training_writes_a_packed_artefact(tmp_path, minilm_dir, glue_dir):
    model_dir = save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2)
    config = tiny_run_config(model_dir, glue_dir, steps=2)
    with config.unlocked():
        config.quantize.kernels = "bits=4"
        config.quantize.embeddings = "bits=8,granularity='tensor'"
        config.quantize.activation_bits = 8
        config.quantize.calibration_batches = 2
    summary = train(config, tmp_path / "run")
    packed = tmp_path / "run" / "quantized" / "params.safetensors"
    assert summary["bytes"] == packed.stat().st_size
    floats = load_file(model_dir / "model.safetensors")
    assert summary["bytes"] < 0.4 * sum(v.nbytes for v in floats.values())
    # The exported float model holds exactly the dequantized weights of the packed file.
    exported = load_file(tmp_path / "run" / "model" / "model.safetensors")
    unpacked = quant_pack.load(packed)
    kernel = flatten_dict(unpacked, sep="/")["bert/encoder/layer/0/attention/self/query/kernel"]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    np.testing.assert_array_equal(exported[name], np.asarray(kernel).T)
    assert len(np.unique(exported[name][0])) <= 15  # 4-bit symmetric: at most 15 levels
    ranges = json.loads((tmp_path / "run" / "quantized" / "quantization.json").read_text())
    assert ranges["activations"]["bits"] == 8 and len(ranges["activations"]["ranges"]) == 14


@pytest.mark.slow
def test_binarybert_training_from_a_ternary_split(tmp_path, minilm_dir, glue_dir):
    config = tiny_model_run_config(tmp_path, minilm_dir, glue_dir, steps=2)
    with config.unlocked():
        config.quantize.kernels = "scheme='binary'"
        config.quantize.binary_split = True
    summary = train(config, tmp_path / "run")
    packed = quant_pack.read(tmp_path / "run" / "quantized" / "params.safetensors")
    name = "bert/encoder/layer/0/output/dense/kernel"
    assert packed.meta["quantized"][name]["halves"] == 2
    assert (
        summary["bytes"] == (tmp_path / "run" / "quantized" / "params.safetensors").stat().st_size
    )
    exported = load_file(tmp_path / "run" / "model" / "model.safetensors")
    column = exported["bert.encoder.layer.0.output.dense.weight"][0]
    assert 2 < len(np.unique(column)) <= 4  # +-s_a +- s_b: a sum of two binary weights
    with config.unlocked():
        config.quantize.kernels = ""
    with pytest.raises(ValueError, match="binary_split needs"):
        train(config, tmp_path / "bad")


@pytest.mark.slow
def test_post_training_quantization_stage(tmp_path, minilm_dir, glue_dir, monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    model_dir = str(save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2))
    w8a8 = {"kernels": "bits=8", "activation_bits": 8, "calibration_batches": 2}
    recipe = {
        "task": "sst2",
        "stages": (
            {"name": "ptq", "kind": "quantize", "model": model_dir, "quantize": w8a8},
            {"name": "float", "kind": "evaluate", "models": (model_dir,)},
        ),
    }
    ptq, reference = recipes.run_recipe(recipe, tmp_path / "recipe")
    assert abs(ptq["value"] - reference["rows"][0]["value"]) < 0.02  # int8 barely moves it
    float_encoder = reference["rows"][0]["bytes_no_embeddings"]
    assert ptq["bytes_no_embeddings"] < 0.5 * float_encoder  # int8 kernels; float biases, LN
    quantization = json.loads((tmp_path / "recipe/ptq/quantized/quantization.json").read_text())
    assert len(quantization["activations"]["ranges"]) == 14
    nothing = {**recipe, "stages": ({**recipe["stages"][0], "quantize": {}},)}
    with pytest.raises(ValueError, match="quantizes nothing"):
        recipes.run_recipe(nothing, tmp_path / "nothing")


def test_integer_bert_matches_fake_quantized_bert(tmp_path):
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    rules = bert_rules.weight_rules(QuantSpec(bits=8), None)
    packed = quant_pack.save(tmp_path / "w8.safetensors", params, rules)
    weights = int8_exec.int8_weights(packed)
    assert len(weights) == 6 * 2 + 2  # every dense kernel of the tiny model
    batch = token_batch(3)
    # dynamic ranges
    fake = QuantizedModel(Bert(config), qat.qat(rules), activation_bits=8, layer_types=(Linear,))
    expected = batch_logits(fake, params, batch)

    @jax.jit
    def integer_logits(params, batch):
        with int8_exec.integer_dense_layers(weights):
            return batch_logits(Bert(config), params, batch)

    got = integer_logits(quant_pack.load(packed), batch)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    hlo = jax.jit(integer_logits).lower(params, batch).as_text()
    assert "i8" in hlo and "i32" in hlo  # the matmuls really run on integers
    assert float(jnp.max(jnp.abs(got - batch_logits(Bert(config), params, batch)))) > 0


@pytest.mark.slow
def test_gobo_stage_needs_no_data_and_reports_packed_bytes(
    tmp_path, minilm_dir, glue_dir, monkeypatch
):
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    model_dir = str(save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2))
    recipe = {
        "task": "sst2",
        "stages": ({"name": "gobo", "kind": "gobo", "model": model_dir, "kernels": 3},),
    }
    (summary,) = recipes.run_recipe(recipe, tmp_path / "recipe")
    assert summary["bytes"] == (tmp_path / "recipe/gobo/gobo.safetensors").stat().st_size
    floats = load_file(f"{model_dir}/model.safetensors")
    exported = load_file(tmp_path / "recipe/gobo/model/model.safetensors")
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    assert len(np.unique(exported[name])) <= 8 + 0.01 * exported[name].size  # 2^3 + outliers
    assert not np.array_equal(exported[name], floats[name])
    assert 0.0 <= summary["value"] <= 1.0


@pytest.mark.slow
def test_qbert_mixed_precision_training_meets_its_budget(tmp_path, minilm_dir, glue_dir):
    model_dir = save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2)
    config = tiny_run_config(model_dir, glue_dir, steps=1)
    with config.unlocked():
        config.quantize.embeddings = "bits=8,granularity='tensor'"
        config.quantize.mixed_bits_budget = 3.0
        config.quantize.mixed_choices = (2, 4)
        config.quantize.mixed_group_size = 16
        config.quantize.hessian_samples = 2
        config.quantize.hessian_batches = 1
    summary = train(config, tmp_path / "run")
    record = json.loads((tmp_path / "run/quantized/quantization.json").read_text())
    bits = record["layer_bits"]
    assert sorted(bits) == ["bert/encoder/layer/0", "bert/encoder/layer/1"]
    assert sorted(bits.values()) == [2, 4]  # equal sizes: the average must be exactly 3
    exported = load_file(tmp_path / "run/model/model.safetensors")
    for layer, width in bits.items():
        index = layer.rsplit("/", 1)[1]
        weight = exported[f"bert.encoder.layer.{index}.intermediate.dense.weight"]
        column_group = weight[0, :16]  # one output row's first group of 16 input rows
        assert len(np.unique(column_group)) <= 2**width - 1
    assert summary["bytes"] == (tmp_path / "run/quantized/params.safetensors").stat().st_size
