"""Factorized embeddings (plain, weighted, frequency SVD) and low-rank kernels: exactness, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.compress import factorize, transforms
from tests.conformance_cases import logits, model_and_batch
from tests.helpers import param_count


def test_factorized_embeddings_counts_and_exactness():
    config, params, batch = model_and_batch(layers=3)
    V, H = config.vocab_size, config.hidden_size  # noqa: N806
    full_config, full = factorize.factorize_embeddings(config, params, H)
    np.testing.assert_allclose(
        logits(full_config, full, batch), logits(config, params, batch), atol=1e-5
    )
    small_config, small = factorize.factorize_embeddings(config, params, 8)
    assert param_count(small) == param_count(params) - V * H + V * 8 + 8 * H
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
    config, params, batch = model_and_batch(layers=3)
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
    config, params, batch = model_and_batch(layers=3)
    rule = [(r"bert/encoder/layer/\d+/intermediate/dense/kernel", factorize.LowRank(rank=4))]
    new_config, new_params = factorize.low_rank(config, params, rule)
    H, F = config.hidden_size, config.intermediate_size  # noqa: N806
    assert param_count(new_params) == param_count(params) - 3 * (H * F - 4 * (H + F))
    assert dict(new_config.low_rank)["bert/encoder/layer/1/intermediate/dense"] == 4

    def flops(cfg, p):
        compiled = jax.jit(lambda q: logits(cfg, q, batch)).lower(p).compile()
        analysis = compiled.cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    assert flops(new_config, new_params) < flops(config, params)
