"""PoWER-BERT word-vector elimination: significance, selection, the model path, retention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.compress.dynamic import token_drop
from jaxcompress.models import artefact
from jaxcompress.models.bert import Bert, BertConfig, init_params
from jaxcompress.models.hf import hf_config_dict
from tests.helpers import peaked_config, tiny_config

L = 8


def three_layers(**changes) -> BertConfig:
    return peaked_config(3, **changes)


def batch(lengths=(8, 5, 3)) -> dict[str, jax.Array]:
    ids = jax.random.randint(jax.random.key(7), (len(lengths), L), 1, 512)
    mask = (jnp.arange(L)[None, :] < jnp.array(lengths)[:, None]).astype(jnp.int32)
    return {"input_ids": ids * mask, "attention_mask": mask}


def apply(config, params, b, **kwargs):
    return Bert(config).apply({"params": params}, b["input_ids"], b["attention_mask"], **kwargs)


@pytest.fixture(scope="module")
def model():
    config = three_layers()
    return config, init_params(config, jax.random.key(0))


def test_full_retention_equals_the_full_model(model):
    config, params = model
    b = batch()
    full = apply(config, params, b, output_hidden_states=True)
    kept = apply(config.replace(token_keep=(1.0,) * 3), params, b, output_hidden_states=True)
    np.testing.assert_allclose(kept.logits, full.logits, atol=1e-6)
    np.testing.assert_allclose(kept.last_hidden_state, full.last_hidden_state, atol=1e-6)
    for ours, theirs in zip(kept.hidden_states, full.hidden_states, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_retention_shortens_later_layers(model):
    config, params = model
    b = batch()
    out = apply(
        config.replace(token_keep=(1.0, 0.5, 0.25)),
        params,
        b,
        output_hidden_states=True,
        output_attentions=True,
    )
    lengths = [h.shape[1] for h in out.hidden_states]
    assert lengths == [8, 8, 4, 2]
    assert [a.shape for a in out.attentions] == [(3, 4, 8, 8), (3, 4, 8, 8), (3, 4, 4, 4)]
    assert out.last_hidden_state.shape == (3, 2, 32)
    assert np.isfinite(np.asarray(out.logits)).all()
    full = apply(config, params, b)
    assert not np.allclose(out.logits, full.logits, atol=1e-3)  # it really dropped tokens


def test_dropping_only_padding_changes_nothing(model):
    """Rows with 4 real tokens of 8: keeping half keeps exactly the real ones."""
    config, params = model
    b = batch(lengths=(4, 4, 4))
    full = apply(config, params, b)
    half = apply(config.replace(token_keep=(0.5, 0.5, 0.5)), params, b)
    np.testing.assert_allclose(half.logits, full.logits, atol=1e-5)
    np.testing.assert_allclose(half.last_hidden_state, full.last_hidden_state[:, :4], atol=1e-5)


def test_first_layer_keeps_the_most_significant_vectors(model):
    """Layer 0's output under elimination is the full layer-0 output at the top-k positions
    of layer 0's significance, in order (layer 0's attention and FFN act per position)."""
    config, params = model
    b = batch()
    full = apply(config, params, b, output_hidden_states=True, output_attentions=True)
    mask = np.asarray(b["attention_mask"]) > 0
    mass = np.asarray(full.attentions[0] * mask[:, None, :, None]).sum((1, 2))
    scores = np.where(mask, mass, -np.inf)
    scores[:, 0] = np.inf
    index = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :3], axis=1)
    assert (index[:, 0] == 0).all()
    out = apply(
        config.replace(token_keep=(0.375, 0.375, 0.375)), params, b, output_hidden_states=True
    )
    expected = np.take_along_axis(np.asarray(full.hidden_states[1]), index[:, :, None], axis=1)
    np.testing.assert_allclose(out.hidden_states[1], expected, atol=1e-5)


def test_significance_puts_cls_first_and_padding_last():
    probs = jnp.array([[[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.9, 0.1, 0.0]]]])  # q2 is padding
    mask = jnp.array([[True, True, False]])
    np.testing.assert_allclose(token_drop.attention_mass(probs, mask), [[0.7, 1.3, 0.0]], atol=1e-7)
    np.testing.assert_allclose(
        token_drop.significance(probs, mask), [[np.inf, 1.3, -np.inf]], atol=1e-7
    )


def test_significance_on_a_model(model):
    config, params = model
    b = batch()
    out = apply(config, params, b, output_attentions=True)
    mask = b["attention_mask"] > 0
    scores = np.asarray(token_drop.significance(out.attentions[1], mask))
    assert (scores[:, 0] == np.inf).all()
    np.testing.assert_array_equal(scores[1, 5:], -np.inf)
    np.testing.assert_array_equal(scores[2, 3:], -np.inf)
    # Real non-[CLS] tokens share the rest of the mass: heads x real queries in all.
    total = 4 * np.asarray(mask.sum(1), np.float32)
    mass = np.asarray(token_drop.attention_mass(out.attentions[1], mask))
    np.testing.assert_allclose(mass.sum(1), total, rtol=1e-5, atol=1e-6)
    assert np.isfinite(scores[:, 1:][np.asarray(mask)[:, 1:]]).all()


def test_keep_tokens_keeps_order_and_matches_numpy():
    x = jnp.arange(2 * 5 * 2, dtype=jnp.float32).reshape(2, 5, 2)
    mask = jnp.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], bool)
    scores = jnp.array([[np.inf, 0.1, 0.7, -np.inf, 0.3], [np.inf, 0.9, 0.2, 0.8, 0.1]])
    kept, kept_mask = token_drop.keep_tokens(x, mask, scores, 3)
    index = np.sort(np.argsort(-np.asarray(scores), axis=1)[:, :3], axis=1)
    np.testing.assert_array_equal(index, [[0, 2, 4], [0, 1, 3]])
    np.testing.assert_array_equal(kept, np.take_along_axis(np.asarray(x), index[:, :, None], 1))
    np.testing.assert_array_equal(kept[0], [[0, 1], [4, 5], [8, 9]])
    np.testing.assert_array_equal(kept_mask, [[True, True, True], [True, True, True]])


def test_bias_and_mask_round_trip():
    mask = jnp.array([[True, True, False]])
    bias = token_drop.bias_from_mask(mask)
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == jnp.float32
    np.testing.assert_array_equal(bias[0, 0, 0], [0.0, 0.0, np.finfo(np.float32).min])
    np.testing.assert_array_equal(token_drop.mask_from_bias(bias), mask)


def test_kept_counts():
    assert token_drop.kept_counts((1.0, 0.3, 0.25, 0.01), 10) == (10, 3, 3, 1)
    assert token_drop.kept_counts((0.5,), 7) == (4,)


def test_config_validation_and_coercion():
    config = tiny_config(token_keep=[1, 0.5])
    assert config.token_keep == (1.0, 0.5) and isinstance(config.token_keep, tuple)
    assert config.is_uniform and "token_keep" not in hf_config_dict(config)
    with pytest.raises(ValueError, match="2 entries, expected 3"):
        tiny_config(num_hidden_layers=3, token_keep=(1.0, 0.5))
    with pytest.raises(ValueError, match=r"fractions in \(0, 1\]"):
        tiny_config(token_keep=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"fractions in \(0, 1\]"):
        tiny_config(token_keep=(1.5, 1.0))
    with pytest.raises(ValueError, match="non-increasing"):
        tiny_config(token_keep=(0.5, 0.6))
    with pytest.raises(ValueError, match="layerdrop"):
        tiny_config(token_keep=(1.0, 0.5), layerdrop=0.1)


@pytest.mark.slow
def test_shared_layers_run_unrolled_with_the_scan_parameters():
    config = three_layers(attention_groups=(0, 0, 0), ffn_groups=(0, 0, 0), remat=True)
    params = init_params(config, jax.random.key(3))
    b = batch()
    scanned = apply(config, params, b)
    kept = apply(config.replace(token_keep=(1.0,) * 3), params, b)
    np.testing.assert_allclose(kept.logits, scanned.logits, atol=1e-6)
    short = apply(config.replace(token_keep=(0.5, 0.5, 0.25)), params, b)
    assert short.last_hidden_state.shape == (3, 2, 32)


@pytest.mark.slow
def test_jit_and_gradients(model):
    config, params = model
    b = batch()
    kept = config.replace(token_keep=(1.0, 0.5, 0.25))

    @jax.jit
    def loss(p, ids, mask):
        return Bert(kept).apply({"params": p}, ids, mask).logits.sum()

    eager = float(apply(kept, params, b).logits.sum())
    np.testing.assert_allclose(
        float(loss(params, b["input_ids"], b["attention_mask"])), eager, rtol=1e-5, atol=1e-6
    )
    grads = jax.grad(loss)(params, b["input_ids"], b["attention_mask"])
    flat = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in flat)
    assert (
        float(jnp.abs(grads["bert"]["encoder"]["layer"]["2"]["output"]["dense"]["kernel"]).sum())
        > 0
    )


def test_bfloat16_keeps_working(model):
    config, params = model
    bf16 = config.replace(dtype="bfloat16", token_keep=(1.0, 0.5, 0.25))
    out = apply(bf16, params, batch(), output_hidden_states=True)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert out.last_hidden_state.shape == (3, 2, 32)
    assert np.isfinite(np.asarray(out.logits)).all()


def test_artefact_round_trip_keeps_token_keep(model, tmp_path):
    config, params = model
    kept = config.replace(token_keep=(1.0, 0.5, 0.25))
    artefact.save(kept, params, tmp_path / "model")
    loaded, loaded_params = artefact.load(tmp_path / "model")
    assert loaded == kept and loaded.token_keep == (1.0, 0.5, 0.25)
    b = batch()
    np.testing.assert_array_equal(
        apply(loaded, loaded_params, b).logits, apply(kept, params, b).logits
    )


def test_retention_from_attention(model):
    config, params = model
    as_numpy = {k: np.asarray(v) for k, v in batch().items()}
    keep = token_drop.retention_from_attention(config, params, [as_numpy], keep_mass=0.8)
    assert len(keep) == 3 and all(0.0 < f <= 1.0 for f in keep)
    assert all(b <= a for a, b in zip(keep, keep[1:], strict=False))
    assert all(f * L == round(f * L) for f in keep)  # whole tokens of the padded length
    tiny = token_drop.retention_from_attention(config, params, [as_numpy], keep_mass=1e-3)
    assert tiny == (1 / L,) * 3
    # Everything: every real token. Rows of 8 real tokens need all 8.
    full_rows = {k: np.asarray(v) for k, v in batch(lengths=(8, 8)).items()}
    assert token_drop.retention_from_attention(config, params, [full_rows], 1.0) == (1.0,) * 3
    # Rows of 3 real tokens need 3 of 8; a shorter batch (length 4) counts as padded to 8,
    # and an all-padding row is ignored.
    three = {k: np.asarray(v) for k, v in batch(lengths=(3, 3, 0)).items()}
    short = {k: v[:, :4] for k, v in three.items()}
    assert token_drop.retention_from_attention(config, params, [three, short], 1.0) == (0.375,) * 3
    assert config.replace(token_keep=keep).token_keep == keep
    with pytest.raises(ValueError, match="keep_mass"):
        token_drop.retention_from_attention(config, params, [as_numpy], keep_mass=0.0)
