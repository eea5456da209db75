"""Students from a teacher: kept layers are the teacher's layers, sliced widths are masked ones."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.compress import factorize, share, transforms
from jaxcompress.compress.distill import student
from jaxcompress.models.bert import Bert, Layer, abstract_params, init_params
from tests.conformance_cases import logits, model_and_batch
from tests.helpers import LAYER, assert_layers_taken, param_count, tiny_config


def hidden_states(config, params, batch):
    out = Bert(config).apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        output_hidden_states=True,
    )
    return out.hidden_states


def composed_hidden_states(config, params, layers, batch):
    """The teacher's embedding output, then the teacher's own layer modules one after another
    (dense kernels, so a standalone `Layer` can run them)."""
    dense_config, dense = config.replace(low_rank=()), factorize.densify(params)
    x = hidden_states(dense_config, dense, batch)[0]
    mask = batch["attention_mask"]
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    states = [x]
    for t in layers:
        layer = Layer(dense_config, config.layer_heads(t), config.layer_intermediate(t), True)
        x, _ = layer.apply({"params": dense["bert"]["encoder"]["layer"][str(t)]}, x, bias)
        states.append(x)
    return states


def random_params(config, seed: int = 0) -> dict:
    """Random parameters of config's shapes without compiling an initialiser (LayerNorm scales
    near one)."""
    rng = np.random.default_rng(seed)
    flat = flatten_dict(abstract_params(config), sep="/")
    out = {
        path: jnp.asarray(rng.normal(float(path.endswith("scale")), 0.1, x.shape), x.dtype)
        for path, x in flat.items()
    }
    return unflatten_dict(out, sep="/")


def six_layer_model_and_batch(layers=3):
    _, _, batch = model_and_batch(layers=3)
    config = tiny_config(num_hidden_layers=6, num_labels=2, vocab_size=512)
    return config, init_params(config, jax.random.key(0)), batch


def test_select_layers_strategies():
    assert student.select_layers(6, 3, "every_other") == (1, 3, 5)
    assert student.select_layers(6, 2, "uniform") == (2, 5)
    assert student.select_layers(12, 6, "every_other") == (1, 3, 5, 7, 9, 11)
    assert student.select_layers(12, 5, "uniform") == (1, 3, 6, 8, 11)
    assert student.select_layers(6, 6, "uniform") == tuple(range(6))
    assert student.select_layers(6, 1, "uniform") == (5,)
    assert student.select_layers(6, 2, "first") == (0, 1)
    assert student.select_layers(6, 2, "top") == (4, 5)
    with pytest.raises(ValueError, match="every_other.*uniform.*first.*top"):
        student.select_layers(6, 2, "bottom")
    for keep in (0, 7):
        with pytest.raises(ValueError, match="keep must be in 1..6"):
            student.select_layers(6, keep, "first")


def test_keeping_all_layers_reproduces_the_teacher_exactly():
    config, params, batch = model_and_batch(layers=3)
    new_config, new_params = student.keep_layers(config, params, (0, 1, 2))
    assert new_config == config
    np.testing.assert_array_equal(
        logits(new_config, new_params, batch), logits(config, params, batch)
    )


def test_kept_layers_are_the_teachers_layers():
    config, params, batch = six_layer_model_and_batch(layers=3)
    new_config, new_params = student.keep_layers(config, params, (1, 3, 5))
    assert new_config == config.replace(num_hidden_layers=3)
    assert_layers_taken(new_params, params, (1, 3, 5))
    flat, new_flat = flatten_dict(params, sep="/"), flatten_dict(new_params, sep="/")
    assert len(new_flat) == len(flat) - 3 * 16  # 16 arrays per layer
    got = hidden_states(new_config, new_params, batch)
    want = composed_hidden_states(config, params, (1, 3, 5), batch)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_keep_layers_subsets_pruned_and_low_rank_layers():
    low_rank = (
        (f"{LAYER}1/intermediate/dense", 5),
        (f"{LAYER}2/attention/output/dense", 3),
        (f"{LAYER}3/attention/self/query", 4),
        ("bert/pooler/dense", 6),
    )
    config = tiny_config(
        num_hidden_layers=4,
        num_labels=2,
        vocab_size=512,
        heads_per_layer=(4, 2, 3, 1),
        intermediate_per_layer=(64, 16, 32, 0),
        low_rank=low_rank,
    )
    params = random_params(config)
    _, _, batch = model_and_batch(layers=3)
    new_config, new_params = student.keep_layers(config, params, (1, 3))
    assert new_config.num_hidden_layers == 2
    assert new_config.heads_per_layer == (2, 1)
    assert new_config.intermediate_per_layer == (16, 0)
    assert new_config.low_rank == (
        ("bert/encoder/layer/0/intermediate/dense", 5),
        ("bert/encoder/layer/1/attention/self/query", 4),
        ("bert/pooler/dense", 6),
    )
    got = hidden_states(new_config, new_params, batch)
    want = composed_hidden_states(config, params, (1, 3), batch)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert logits(new_config, new_params, batch).shape == (4, 2)


def test_keep_layers_unshares_a_shared_teacher():
    config = tiny_config(
        num_hidden_layers=3,
        num_labels=2,
        vocab_size=512,
        attention_groups=(0, 1, 1),
        ffn_groups=(0, 0, 1),
        low_rank=((f"{LAYER}1/intermediate/dense", 5), (f"{LAYER}1/attention/self/key", 4)),
    )
    params = random_params(config)
    _, _, batch = model_and_batch(layers=3)
    all_config, all_params = student.keep_layers(config, params, (0, 1, 2))
    assert all_config.attention_groups is None and all_config.ffn_groups is None
    assert all_config.low_rank == (
        (f"{LAYER}1/attention/self/key", 4),
        (f"{LAYER}2/attention/self/key", 4),
        (f"{LAYER}2/intermediate/dense", 5),
    )
    np.testing.assert_allclose(
        logits(all_config, all_params, batch), logits(config, params, batch), atol=1e-5
    )
    new_config, new_params = student.keep_layers(config, params, (1, 2))
    layer = params["bert"]["encoder"]["layer"]
    new_layer = new_params["bert"]["encoder"]["layer"]
    for j, (attention_group, ffn_group) in enumerate([(1, 0), (1, 1)]):
        np.testing.assert_array_equal(
            new_layer[str(j)]["attention"]["self"]["key"]["kernel_b"],
            layer[str(attention_group)]["attention"]["self"]["key"]["kernel_b"],
        )
        np.testing.assert_array_equal(
            new_layer[str(j)]["output"]["dense"]["kernel"],
            layer[str(ffn_group)]["output"]["dense"]["kernel"],
        )
    assert logits(new_config, new_params, batch).shape == (4, 2)


def test_keep_layers_after_share_layers_keeps_the_shared_values():
    config, params, batch = model_and_batch(layers=3)
    shared_config, shared = share.share_layers(
        config, params, attention_groups=(0, 0, 0), ffn_groups=(0, 0, 0)
    )
    new_config, new_params = student.keep_layers(shared_config, shared, (0, 2))
    layers = new_params["bert"]["encoder"]["layer"]
    assert sorted(layers) == ["0", "1"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, layers["0"], layers["1"])
    assert new_config.num_hidden_layers == 2 and new_config.attention_groups is None


@pytest.mark.parametrize("layers", [(), (1, 1), (2, 1), (-1, 0), (0, 3)])
def test_keep_layers_rejects_bad_layers(layers):
    config, params, _ = model_and_batch(layers=3)
    with pytest.raises(ValueError, match="strictly increasing"):
        student.keep_layers(config, params, layers)


def bert_count(config, heads_width: int) -> int:
    """Parameters of an uncompressed BERT with a classifier; heads_width = heads * head_size."""
    h, a, f = config.hidden_size, heads_width, config.intermediate_size
    tables = config.vocab_size + config.max_position_embeddings + config.type_vocab_size
    layer = 3 * (h * a + a) + (a * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    head = (h * h + h) + (h * config.num_labels + config.num_labels)
    return tables * h + 2 * h + config.num_hidden_layers * layer + head


@pytest.mark.parametrize(
    "widths, head_size",
    [
        (dict(hidden_size=16, num_heads=2, intermediate_size=32), None),
        (dict(hidden_size=16), 8),
        (dict(num_heads=1), 8),
        (dict(intermediate_size=8), None),
    ],
)
def test_shrink_width_shapes_and_count(widths, head_size):
    config, params, _ = model_and_batch(layers=3)
    assert param_count(params) == bert_count(config, 32)
    new_config, new_params = student.shrink_width(config, params, **widths)
    assert new_config.head_size == head_size
    assert new_config.attention_head_size == config.attention_head_size
    assert new_config.hidden_size == widths.get("hidden_size", 32)
    assert new_config.num_attention_heads == widths.get("num_heads", 4)
    assert new_config.intermediate_size == widths.get("intermediate_size", 64)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, new_params)
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, abstract_params(new_config))
    assert param_count(new_params) == bert_count(new_config, new_config.num_attention_heads * 8)


def test_slice_keeps_the_leading_block_of_every_parameter():
    config, params, _ = model_and_batch(layers=3)
    _, new = student.shrink_width(config, params, hidden_size=16, num_heads=2, intermediate_size=24)
    bert, new_bert = params["bert"], new["bert"]
    np.testing.assert_array_equal(
        new_bert["embeddings"]["word_embeddings"], bert["embeddings"]["word_embeddings"][:, :16]
    )
    np.testing.assert_array_equal(
        new_bert["embeddings"]["LayerNorm"]["scale"], bert["embeddings"]["LayerNorm"]["scale"][:16]
    )
    layer, new_layer = bert["encoder"]["layer"]["2"], new_bert["encoder"]["layer"]["2"]
    np.testing.assert_array_equal(
        new_layer["attention"]["self"]["value"]["kernel"],
        layer["attention"]["self"]["value"]["kernel"][:16, :16],
    )
    np.testing.assert_array_equal(
        new_layer["attention"]["output"]["dense"]["kernel"],
        layer["attention"]["output"]["dense"]["kernel"][:16, :16],
    )
    np.testing.assert_array_equal(
        new_layer["output"]["dense"]["kernel"], layer["output"]["dense"]["kernel"][:24, :16]
    )
    np.testing.assert_array_equal(
        new_layer["intermediate"]["dense"]["bias"], layer["intermediate"]["dense"]["bias"][:24]
    )
    np.testing.assert_array_equal(
        new_bert["pooler"]["dense"]["kernel"], bert["pooler"]["dense"]["kernel"][:16, :16]
    )
    np.testing.assert_array_equal(new["classifier"]["kernel"], params["classifier"]["kernel"][:16])
    np.testing.assert_array_equal(new["classifier"]["bias"], params["classifier"]["bias"])


def test_shrink_width_without_shrinking_is_identity():
    config, params, _ = model_and_batch(layers=3)
    new_config, new_params = student.shrink_width(config, params)
    assert new_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_params, params)


def _zero_rows(params, module: str, start: int) -> dict:
    """Zero rows start: of `module`'s kernel in every layer."""
    flat = flatten_dict(params, sep="/")
    for path in flat:
        if re.fullmatch(rf"{LAYER}\d+/{module}/kernel", path):
            flat[path] = flat[path].at[start:].set(0.0)
    return unflatten_dict(flat, sep="/")


def test_slicing_ffn_neurons_equals_zeroing_their_outputs():
    config, params, batch = model_and_batch(layers=3)
    new_config, new_params = student.shrink_width(config, params, intermediate_size=24)
    masked = _zero_rows(params, "output/dense", 24)  # GELU(h) only reaches the model through here
    np.testing.assert_allclose(
        logits(new_config, new_params, batch), logits(config, masked, batch), atol=1e-5
    )


def test_slicing_heads_equals_zeroing_their_outputs():
    config, params, batch = model_and_batch(layers=3)
    new_config, new_params = student.shrink_width(config, params, num_heads=3)
    assert new_config.head_size == 8
    masked = _zero_rows(params, "attention/output/dense", 3 * 8)
    np.testing.assert_allclose(
        logits(new_config, new_params, batch), logits(config, masked, batch), atol=1e-5
    )


@pytest.mark.parametrize(
    "changes",
    [
        dict(embedding_size=8),
        dict(heads_per_layer=(4, 2)),
        dict(intermediate_per_layer=(64, 32)),
        dict(attention_groups=(0, 0)),
        dict(ffn_groups=(0, 0)),
        dict(low_rank=((f"{LAYER}0/output/dense", 4),)),
    ],
)
def test_shrink_width_rejects_compressed_models(changes):
    config = tiny_config(vocab_size=64, **changes)
    params = abstract_params(config)
    (field,) = changes
    with pytest.raises(ValueError, match=f"config.{field} is set"):
        student.shrink_width(config, params, hidden_size=16)


def test_shrink_width_rejects_bad_widths():
    config, params, _ = model_and_batch(layers=3)
    with pytest.raises(ValueError, match="num_heads must be in 1..4"):
        student.shrink_width(config, params, num_heads=5)
    with pytest.raises(ValueError, match="hidden_size must be in 1..32"):
        student.shrink_width(config, params, hidden_size=0)
    with pytest.raises(ValueError, match="init must be"):
        student.shrink_width(config, params, init="copy")


def test_fresh_students_and_reinitialize_keep_dtypes():
    config, params, _ = model_and_batch(layers=3)
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    small_config, small = student.shrink_width(
        config, bf16, hidden_size=16, num_heads=2, init="fresh", seed=3
    )
    expected = init_params(small_config, jax.random.key(3))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), small, expected
    )
    same_config, fresh = student.reinitialize(config, params, seed=1)
    assert same_config == config
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, fresh, init_params(config, jax.random.key(1))
    )
    query = ("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel")
    assert not np.array_equal(flatten_dict(fresh)[query], flatten_dict(params)[query])
    _, fresh_bf16 = student.reinitialize(config, bf16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(fresh_bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_student_transforms_by_name():
    config, params, _ = six_layer_model_and_batch(layers=3)
    top_config, top = transforms.parse("keep_layers(keep=2, strategy='top')")(config, params)
    explicit_config, explicit = transforms.parse("keep_layers(layers=[4, 5])")(config, params)
    assert top_config == explicit_config
    jax.tree_util.tree_map(np.testing.assert_array_equal, top, explicit)
    spec = "shrink_width(hidden_size=16, num_heads=2, intermediate_size=32)"
    narrow_config, _ = transforms.parse(spec)(config, params)
    assert (narrow_config.hidden_size, narrow_config.intermediate_size) == (16, 32)
    composed = transforms.from_specs(["keep_layers(keep=3)", spec, "reinitialize(seed=2)"])
    small_config, small = composed(config, params)
    assert small_config.num_hidden_layers == 3
    assert param_count(small) == bert_count(small_config, 16)
    with pytest.raises(ValueError, match="exactly one of keep or layers"):
        transforms.parse("keep_layers(keep=2, layers=[0, 1])")
    with pytest.raises(ValueError, match="exactly one of keep or layers"):
        transforms.parse("keep_layers()")
    with pytest.raises(ValueError, match="strategy must be one of"):
        transforms.parse("keep_layers(keep=2, strategy='bottom')")
    with pytest.raises(ValueError, match="init must be"):
        transforms.parse("shrink_width(init='copy')")


def test_magnitude_width_keeps_the_heaviest_dimensions_heads_and_neurons():
    config, params, _ = model_and_batch(layers=3)
    hidden, head, neuron = [1, 5, 9, 13], 3, 7  # made heavy wherever they appear
    heavy = {}
    for path, x in flatten_dict(params, sep="/").items():
        x = np.array(x)
        if path.endswith("word_embeddings"):
            x[:, hidden] *= 100.0
        if path.endswith("attention/self/value/kernel"):
            x[:, head * 8 : (head + 1) * 8] *= 100.0
        if path.endswith("intermediate/dense/kernel"):
            x[:, neuron] *= 100.0
        heavy[path] = x
    params = unflatten_dict({k: jnp.asarray(v) for k, v in heavy.items()}, sep="/")
    new_config, new = student.shrink_width(
        config, params, hidden_size=4, num_heads=1, intermediate_size=1, init="magnitude"
    )
    flat = flatten_dict(new, sep="/")
    assert (new_config.hidden_size, new_config.num_attention_heads) == (4, 1)
    words = "bert/embeddings/word_embeddings"
    np.testing.assert_array_equal(flat[words], heavy[words][:, hidden])
    value = "bert/encoder/layer/0/attention/self/value/kernel"
    np.testing.assert_array_equal(flat[value], heavy[value][hidden][:, head * 8 : head * 8 + 8])
    out = "bert/encoder/layer/1/output/dense/kernel"
    np.testing.assert_array_equal(flat[out], heavy[out][neuron : neuron + 1][:, hidden])
