"""Cross-layer sharing: exactness, summed gradients, groups, one compiled layer, save, unshare."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.compress import factorize, share
from jaxcompress.models import artefact
from jaxcompress.models.bert import Bert, init_params, unshare_layers
from tests.conformance_cases import logits, model_and_batch
from tests.helpers import param_count, tiny_config


def _identical_layers(config, params):
    flat = flatten_dict(params, sep="/")
    first = "bert/encoder/layer/0/"
    for path in list(flat):
        if path.startswith("bert/encoder/layer/") and not path.startswith(first):
            rest = path.split("/", 4)[4]
            flat[path] = flat[first + rest]
    return unflatten_dict(flat, sep="/")


@pytest.mark.parametrize("scope", ["layer", "attention", "ffn"])
def test_sharing_identical_layers_reproduces_the_unshared_model(scope):
    config, params, batch = model_and_batch(layers=3)
    params = _identical_layers(config, params)
    groups = share.all_layers(3)
    maps = {
        "attention_groups": groups if scope in ("layer", "attention") else None,
        "ffn_groups": groups if scope in ("layer", "ffn") else None,
    }
    shared_config, shared = share.share_layers(config, params, **maps)
    np.testing.assert_allclose(
        logits(shared_config, shared, batch), logits(config, params, batch), atol=1e-6
    )
    layers = shared["bert"]["encoder"]["layer"]
    if scope == "attention":
        assert sorted(layers["1"]) == ["intermediate", "output"]
    if scope == "ffn":
        assert sorted(layers["2"]) == ["attention"]
    if scope == "layer":
        assert sorted(layers) == ["0"]


def test_shared_gradient_is_the_sum_over_layers():
    config, params, batch = model_and_batch(layers=3)
    params = _identical_layers(config, params)
    shared_config, shared = share.share_layers(
        config, params, attention_groups=share.all_layers(3), ffn_groups=share.all_layers(3)
    )

    def loss(cfg, p):
        return jnp.sum(logits(cfg, p, batch) ** 2)

    g_unshared = jax.jit(jax.grad(lambda p: loss(config, p)))(params)
    g_shared = jax.jit(jax.grad(lambda p: loss(shared_config, p)))(shared)
    per_layer = g_unshared["bert"]["encoder"]["layer"]
    total = jax.tree_util.tree_map(lambda *xs: sum(xs), *[per_layer[str(i)] for i in range(3)])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        g_shared["bert"]["encoder"]["layer"]["0"],
        total,
    )


def test_init_choices_and_groups():
    config, params, _ = model_and_batch(layers=3)
    layer = params["bert"]["encoder"]["layer"]
    q = [layer[str(i)]["attention"]["self"]["query"]["kernel"] for i in range(3)]
    groups = share.every_k(3, 2)
    assert groups == (0, 0, 1)
    _, mean = share.share_layers(config, params, attention_groups=groups, ffn_groups=groups)
    np.testing.assert_allclose(
        mean["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
        (q[0] + q[1]) / 2,
        atol=1e-7,
    )
    np.testing.assert_array_equal(
        mean["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"], q[2]
    )
    _, last = share.share_layers(config, params, attention_groups=(0, 0, 0), init=1)
    np.testing.assert_array_equal(
        last["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"], q[1]
    )
    with pytest.raises(ValueError, match="not in the group"):
        share.share_layers(config, params, attention_groups=(0, 0, 1), init=2)


def test_all_layer_sharing_compiles_one_layer():
    config = tiny_config(num_hidden_layers=6, num_labels=2, vocab_size=512)
    params = init_params(config, jax.random.key(0))
    shared_config, shared = share.share_layers(
        config, params, attention_groups=share.all_layers(6), ffn_groups=share.all_layers(6)
    )
    ids = jnp.ones((2, 16), jnp.int32)

    def program_size(cfg, p):
        fn = jax.jit(lambda q: Bert(cfg).apply({"params": q}, ids).logits)
        return len(fn.lower(p).compile().as_text())

    unshared, one_group = program_size(config, params), program_size(shared_config, shared)
    assert one_group < 0.5 * unshared


def test_saved_bytes_match_the_parameter_count(tmp_path):
    config, params, batch = model_and_batch(layers=3)
    config, params = factorize.factorize_embeddings(config, params, 8)
    config, params = share.share_layers(config, params, attention_groups=(0, 0, 0))
    sizes = artefact.saved_bytes(params)
    flat = flatten_dict(params, sep="/")
    embedding = sum(v.size for k, v in flat.items() if artefact.is_embedding(k))
    header_slack = 200 * len(flat)  # safetensors JSON header: about 100 bytes per tensor
    assert 0 < sizes["bytes"] - 4 * param_count(params) < header_slack
    assert 0 < sizes["bytes_no_embeddings"] - 4 * (param_count(params) - embedding) < header_slack
    artefact.save(config, params, tmp_path / "m")
    loaded_config, loaded = artefact.load(tmp_path / "m")
    assert loaded_config == config
    np.testing.assert_array_equal(
        logits(loaded_config, loaded, batch), logits(config, params, batch)
    )


def test_unsharing_a_low_rank_shared_layer_keeps_its_outputs():
    config, params, batch = model_and_batch(layers=3)
    shared_config, shared = share.share_layers(
        config, params, attention_groups=(0, 0, 0), ffn_groups=(0, 0, 0)
    )
    rule = [(r"bert/encoder/layer/0/intermediate/dense/kernel", factorize.LowRank(rank=4))]
    low_config, low = factorize.low_rank(shared_config, shared, rule)
    unshared_config, unshared = unshare_layers(low_config, low)
    assert dict(unshared_config.low_rank) == {
        f"bert/encoder/layer/{i}/intermediate/dense": 4 for i in range(3)
    }
    np.testing.assert_allclose(
        logits(unshared_config, unshared, batch), logits(low_config, low, batch), atol=1e-5
    )
