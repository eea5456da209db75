"""Exactness of factorized embeddings, low-rank kernels and cross-layer sharing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.compress import factorize, share, transforms
from jaxcompress.models import artefact
from jaxcompress.models.bert import Bert, init_params, unshare_layers

from .conformance_cases import logits, model_and_batch
from .helpers import tiny_config


def count(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_factorized_embeddings_counts_and_exactness():
    config, params, batch = model_and_batch()
    V, H = config.vocab_size, config.hidden_size  # noqa: N806
    full_config, full = factorize.factorize_embeddings(config, params, H)
    np.testing.assert_allclose(
        logits(full_config, full, batch), logits(config, params, batch), atol=1e-5
    )
    small_config, small = factorize.factorize_embeddings(config, params, 8)
    assert count(small) == count(params) - V * H + V * 8 + 8 * H
    assert small_config.embedding_size == 8
    with pytest.raises(ValueError, match="already factorized"):
        factorize.factorize_embeddings(small_config, small, 4)
    fresh_config, fresh = factorize.factorize_embeddings(
        config, params, 8, init="fresh", key=jax.random.key(0)
    )
    assert fresh["bert"]["embeddings"]["word_embeddings"].shape == (V, 8)


def test_svd_keeps_the_best_rank_r_approximation():
    kernel = jax.random.normal(jax.random.key(0), (32, 48))
    a, b = factorize.svd_factors(kernel, 32)
    np.testing.assert_allclose(a @ b, kernel, atol=1e-5)
    s = np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)
    a, b = factorize.svd_factors(kernel, 10)
    error = np.linalg.norm(np.asarray(a @ b - kernel))
    np.testing.assert_allclose(
        error, np.sqrt(np.sum(s[10:] ** 2)), rtol=1e-4, atol=1e-6
    )  # Eckart-Young
    assert factorize.LowRank(energy=1.0).rank_for(s) == 32
    share_at_10 = np.sum(s[:10] ** 2) / np.sum(s**2)
    assert factorize.LowRank(energy=share_at_10).rank_for(s) == 10
    assert factorize.LowRank(fraction=0.5).rank_for(s) == 16
    with pytest.raises(ValueError, match="exactly one"):
        factorize.LowRank(rank=3, fraction=0.5)


def test_weighted_svd_minimises_the_weighted_error():
    kernel = np.asarray(jax.random.normal(jax.random.key(1), (40, 12)), np.float64)
    weights = np.exp(np.asarray(jax.random.normal(jax.random.key(2), (40,)), np.float64) * 2)

    def weighted_error(a, b):
        return np.sum(weights[:, None] * (np.asarray(a @ b, np.float64) - kernel) ** 2)

    plain = factorize.svd_factors(jnp.asarray(kernel), 4)
    uniform = factorize.weighted_svd_factors(jnp.asarray(kernel), 4, np.ones(40))
    np.testing.assert_allclose(uniform[0] @ uniform[1], plain[0] @ plain[1], atol=1e-10)
    weighted = factorize.weighted_svd_factors(jnp.asarray(kernel), 4, weights)
    assert weighted_error(*weighted) < weighted_error(*plain)
    # The closed form is optimal: no random rank-4 perturbation of it does better.
    for seed in range(5):
        noise = 1e-3 * np.random.default_rng(seed).normal(size=(40, 4))
        assert weighted_error(weighted[0] + noise, weighted[1]) > weighted_error(*weighted)
    with pytest.raises(ValueError, match="positive"):
        factorize.weighted_svd_factors(jnp.asarray(kernel), 4, np.zeros(40))


def test_frequency_svd_embeddings_use_the_callers_token_counts():
    config, params, batch = model_and_batch()
    counts = np.zeros(config.vocab_size)
    counts[np.asarray(batch["input_ids"]).ravel()] = 1000.0
    seen = []

    def token_counts(vocab_size):
        seen.append(vocab_size)
        return counts

    context = transforms.TransformContext(token_counts=token_counts)
    spec = "factorize_embeddings(embedding_size=8, init='frequency_svd')"
    freq_config, freq = transforms.from_specs([spec], context)(config, params)
    assert seen == [config.vocab_size] and freq_config.embedding_size == 8
    plain_config, plain = factorize.factorize_embeddings(config, params, 8)
    reference = logits(config, params, batch)
    freq_error = np.abs(logits(freq_config, freq, batch) - reference).max()
    plain_error = np.abs(logits(plain_config, plain, batch) - reference).max()
    assert freq_error < plain_error  # the rank went to the tokens in use
    with pytest.raises(ValueError, match="token counts"):
        transforms.parse(spec)


def test_low_rank_counts_flops_and_config():
    config, params, batch = model_and_batch()
    rule = [(r"bert/encoder/layer/\d+/intermediate/dense/kernel", factorize.LowRank(rank=4))]
    new_config, new_params = factorize.low_rank(config, params, rule)
    H, F = config.hidden_size, config.intermediate_size  # noqa: N806
    assert count(new_params) == count(params) - 3 * (H * F - 4 * (H + F))
    assert dict(new_config.low_rank)["bert/encoder/layer/1/intermediate/dense"] == 4

    def flops(cfg, p):
        compiled = jax.jit(lambda q: logits(cfg, q, batch)).lower(p).compile()
        analysis = compiled.cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    assert flops(new_config, new_params) < flops(config, params)


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
    config, params, batch = model_and_batch()
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
    config, params, batch = model_and_batch()
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
    config, params, _ = model_and_batch()
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
    config, params, batch = model_and_batch()
    config, params = factorize.factorize_embeddings(config, params, 8)
    config, params = share.share_layers(config, params, attention_groups=(0, 0, 0))
    sizes = artefact.saved_bytes(params)
    flat = flatten_dict(params, sep="/")
    embedding = sum(v.size for k, v in flat.items() if artefact.is_embedding(k))
    header_slack = 200 * len(flat)  # safetensors JSON header: about 100 bytes per tensor
    assert 0 < sizes["bytes"] - 4 * count(params) < header_slack
    assert 0 < sizes["bytes_no_embeddings"] - 4 * (count(params) - embedding) < header_slack
    artefact.save(config, params, tmp_path / "m")
    loaded_config, loaded = artefact.load(tmp_path / "m")
    assert loaded_config == config
    np.testing.assert_array_equal(
        logits(loaded_config, loaded, batch), logits(config, params, batch)
    )


def test_unsharing_a_low_rank_shared_layer_keeps_its_outputs():
    config, params, batch = model_and_batch()
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
