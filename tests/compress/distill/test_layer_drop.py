"""Layer dropping (Sajjad et al.'s strategies) and LayerDrop training (Fan et al.)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxcompress.compress import transforms
from jaxcompress.compress.distill import student
from jaxcompress.models import artefact
from jaxcompress.models.bert import Bert, BertConfig, Layer, init_params
from jaxcompress.models.hf import hf_config_dict
from tests.conformance_cases import model_and_batch
from tests.helpers import LAYER, assert_layers_taken, peaked_config, tiny_config


def batch():
    return model_and_batch()[2]


def four_layers(**changes) -> BertConfig:
    return peaked_config(4, **changes)


def apply(config, params, key=None, **kwargs):
    b = batch()
    return Bert(config).apply(
        {"params": params},
        b["input_ids"],
        b["attention_mask"],
        b["token_type_ids"],
        deterministic=key is None,
        rngs=None if key is None else {"dropout": key},
        **kwargs,
    )


@functools.partial(jax.jit, static_argnums=0)
def training_hidden_states(config, params, keys) -> jax.Array:
    """Training-mode hidden states for each key: (keys, layers + 1, B, L, H)."""

    def run(key):
        return jnp.stack(apply(config, params, key, output_hidden_states=True).hidden_states)

    return jax.vmap(run)(keys)


def skipped(states) -> np.ndarray:
    """(keys, layers): whether each layer passed its input through (to float rounding: XLA
    may recompute the input in another fusion; a layer that runs changes it by ~1)."""
    states = np.asarray(states)
    return np.abs(states[:, 1:] - states[:, :-1]).max(axis=(2, 3, 4)) < 1e-4


@pytest.mark.parametrize(
    "strategy, six_to_three, twelve_to_six",
    [
        ("every_other", (1, 3, 5), (1, 3, 5, 7, 9, 11)),
        ("drop_top", (0, 1, 2), (0, 1, 2, 3, 4, 5)),
        ("drop_bottom", (3, 4, 5), (6, 7, 8, 9, 10, 11)),
        ("alternate", (0, 2, 4), (0, 2, 4, 6, 8, 10)),
        ("symmetric", (0, 1, 5), (0, 1, 2, 9, 10, 11)),
        ("layerdrop", (0, 2, 4), (0, 2, 4, 6, 8, 10)),
    ],
)
def test_strategies_pick_the_documented_layers(strategy, six_to_three, twelve_to_six):
    assert student.select_layers(6, 3, strategy) == six_to_three
    assert student.select_layers(12, 6, strategy) == twelve_to_six
    assert student.select_layers(6, 6, strategy) == tuple(range(6))


def test_strategies_beyond_half_and_by_contribution():
    assert student.select_layers(6, 2, "alternate") == (0, 2)
    assert student.select_layers(12, 8, "alternate") == (0, 1, 2, 3, 4, 6, 8, 10)
    assert student.select_layers(12, 5, "symmetric") == (0, 1, 2, 10, 11)
    # Fan et al.: drop depth d (1-based) with d = 0 mod 3 for p = 1/3, d = 0 mod 4 for p = 1/4.
    assert student.select_layers(12, 8, "layerdrop") == (0, 1, 3, 4, 6, 7, 9, 10)
    assert student.select_layers(12, 9, "layerdrop") == (0, 1, 2, 4, 5, 6, 8, 9, 10)
    assert student.select_layers(16, 8, "layerdrop") == tuple(range(0, 16, 2))
    scores = (0.3, 0.1, 0.5, 0.1, 0.2, 0.4)
    assert student.select_layers(6, 3, "contribution", scores) == (0, 2, 5)
    assert student.select_layers(6, 5, "contribution", scores) == (0, 1, 2, 4, 5)  # tie: lower
    with pytest.raises(ValueError, match="only by, strategy='contribution'"):
        student.select_layers(6, 3, "contribution")
    with pytest.raises(ValueError, match="only by, strategy='contribution'"):
        student.select_layers(6, 3, "alternate", scores)
    with pytest.raises(ValueError, match=r"shape \(5,\), expected \(6,\)"):
        student.select_layers(6, 3, "contribution", scores[:5])


def test_layer_contributions_average_cosine_over_real_tokens():
    # Batch 1: two real tokens and a pad; batch 2: one real token and a pad.
    h0 = np.array([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    h1 = np.array([[[2.0, 0.0], [0.0, 1.0], [-5.0, 5.0]]])  # cosine 1, 1 (pad ignored)
    h2 = np.array([[[-1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])  # cosine -1, 0
    g0 = np.array([[[1.0, 1.0], [7.0, 0.0]]])
    g1 = np.array([[[1.0, 1.0], [0.0, 7.0]]])  # cosine 1
    g2 = np.array([[[1.0, -1.0], [7.0, 7.0]]])  # cosine 0
    masks = [np.array([[1, 1, 0]]), np.array([[1, 0]])]
    out = student.layer_contributions([(h0, h1, h2), (g0, g1, g2)], masks)
    np.testing.assert_allclose(out, [0.0, 4.0 / 3.0], atol=1e-12)
    with pytest.raises(ValueError, match="one mask per batch"):
        student.layer_contributions([(h0, h1, h2)], masks)
    with pytest.raises(ValueError, match="no real token"):
        student.layer_contributions([(h0, h1, h2)], [np.zeros((1, 3))])


def test_contribution_drops_a_layer_that_passes_its_input_through():
    config = four_layers()
    params = init_params(config, jax.random.key(0))
    layer = params["bert"]["encoder"]["layer"]["2"]
    # No attention or FFN output: both residual LayerNorms (scale 1, bias 0) see an input that
    # is already normalised, so layer 2 returns its input.
    for block in (layer["attention"]["output"]["dense"], layer["output"]["dense"]):
        for name in block:
            block[name] = jnp.zeros_like(block[name])
    states = student.layer_hidden_states(config, params, [batch()])
    scores = student.layer_contributions([s for s, _ in states], [m for _, m in states])
    assert scores[2] < 1e-6
    assert np.delete(scores, 2).min() > 0.3

    calls = []

    def hidden_states(c, p):
        calls.append(c.num_hidden_layers)
        return student.layer_hidden_states(c, p, [batch()])

    context = transforms.TransformContext(hidden_states=hidden_states)
    spec = "keep_layers(keep=3, strategy='contribution')"
    small_config, small = transforms.parse(spec, context)(config, params)
    assert calls == [4]
    assert small_config.num_hidden_layers == 3
    kept = small["bert"]["encoder"]["layer"]
    for j, t in enumerate((0, 1, 3)):
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, kept[str(j)], params["bert"]["encoder"]["layer"][str(t)]
        )
    np.testing.assert_allclose(
        apply(small_config, small).logits, apply(config, params).logits, atol=1e-5
    )
    with pytest.raises(ValueError, match="TransformContext.hidden_states"):
        transforms.parse(spec)
    with pytest.raises(ValueError, match="TransformContext.hidden_states"):
        transforms.parse(spec, transforms.TransformContext())


def test_layerdrop_subnetwork_keeps_every_other_layer():
    config = tiny_config(num_hidden_layers=6, vocab_size=512, layerdrop=0.5)
    params = init_params(config, jax.random.key(0))
    sub_config, sub = student.layerdrop_subnetwork(config, params, 3)
    by_name = transforms.parse("keep_layers(keep=3, strategy='layerdrop')")(config, params)
    assert sub_config == by_name[0] == config.replace(num_hidden_layers=3)
    assert_layers_taken(sub, params, (0, 2, 4))


def test_layerdrop_config_validates_and_stays_out_of_hugging_face(tmp_path):
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="layerdrop"):
            tiny_config(layerdrop=p)
    config = tiny_config(layerdrop=0.2)
    assert config.is_uniform and config.compressed_fields() == ()
    assert "layerdrop" not in hf_config_dict(config)
    assert tiny_config(layerdrop=0.0) == tiny_config()
    params = init_params(config, jax.random.key(0))
    loaded, _ = artefact.load(artefact.save(config, params, tmp_path / "model"))
    assert loaded.layerdrop == 0.2


@pytest.mark.parametrize("groups", [None, (0, 0, 1, 1)], ids=["loop", "scan"])
def test_layerdrop_skips_whole_layers_at_rate_p(groups):
    """Each layer is either skipped (the identity) or exactly the evaluation-mode layer, at
    rate p, independently per layer; evaluation runs every layer."""
    plain = four_layers(attention_groups=groups, ffn_groups=groups)
    config = plain.replace(layerdrop=0.3)
    params = init_params(plain, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 256)
    states = training_hidden_states(config, params, keys)
    skips = skipped(states)
    assert abs(skips.mean() - 0.3) < 0.05
    assert 0.5 < np.mean(skips.any(1) & ~skips.all(1))  # layers are drawn independently
    assert all((skips[:, i] != skips[:, j]).any() for i in range(4) for j in range(i))
    mask = batch()["attention_mask"]
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    layers = params["bert"]["encoder"]["layer"]
    run_layer = jax.jit(lambda p, x: Layer(plain, 4, 64, True).apply({"params": p}, x, bias)[0])
    for k in range(4):  # a kept layer computes exactly what it computes in evaluation
        for i in np.flatnonzero(~skips[k]):
            expected = run_layer(layers[str(plain.attention_group(i))], states[k, i])
            np.testing.assert_allclose(states[k, i + 1], expected, atol=1e-5)


def test_layerdrop_zero_never_skips_near_one_skips_all_and_evaluation_runs_all():
    plain = four_layers()
    params = init_params(plain, jax.random.key(0))
    full = apply(plain, params, output_hidden_states=True)
    for k in range(2):  # no dropout and p = 0: training mode is evaluation mode
        trained = apply(plain, params, jax.random.key(k)).last_hidden_state
        np.testing.assert_allclose(trained, full.last_hidden_state, rtol=1e-5, atol=1e-6)
    almost_all = plain.replace(layerdrop=0.99)
    out = apply(almost_all, params, jax.random.key(0), output_hidden_states=True)
    assert len(out.hidden_states) == 5
    for h in out.hidden_states[1:]:  # every layer skipped with this key (probability 0.96)
        np.testing.assert_array_equal(h, out.hidden_states[0])
    np.testing.assert_array_equal(out.last_hidden_state, full.hidden_states[0])
    evaluated = apply(almost_all, params).last_hidden_state
    np.testing.assert_allclose(evaluated, full.last_hidden_state, rtol=1e-5, atol=1e-6)


def test_layerdrop_gives_a_skipped_layer_no_gradient():
    config = four_layers(num_hidden_layers=2, layerdrop=0.5)
    params = init_params(config, jax.random.key(0))

    def loss(p, key):
        out = apply(config, p, key, output_hidden_states=True, output_attentions=True)
        value = jnp.sum(out.logits**2) + sum(jnp.sum(a**2) for a in out.attentions)
        return value, jnp.stack(out.hidden_states)

    grad = jax.jit(jax.grad(loss, has_aux=True))
    mixed = 0
    for key in jax.random.split(jax.random.key(1), 4):
        grads, states = grad(params, key)
        skips = skipped(states[None])[0]
        mixed += skips.any() and not skips.all()
        grads = flatten_dict(grads, sep="/")
        assert all(np.isfinite(g).all() for g in grads.values())
        for i in range(2):
            layer = [g for p, g in grads.items() if p.startswith(f"{LAYER}{i}/")]
            norm = sum(float(jnp.sum(g**2)) for g in layer)
            assert (norm == 0.0) == bool(skips[i]), (i, norm, skips)
    assert mixed >= 1


def test_layerdrop_training_output_depends_on_the_key_only():
    config = four_layers(layerdrop=0.5, hidden_dropout_prob=0.1)
    params = init_params(config, jax.random.key(0))
    a, b = (apply(config, params, jax.random.key(k)).logits for k in (3, 4))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, apply(config, params, jax.random.key(3)).logits)
