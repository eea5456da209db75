"""Distillation losses, layer maps, projections and the combined objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.compress import share
from jaxcompress.compress.distill import losses as distill
from jaxcompress.compress.distill import objective as objectives
from jaxcompress.models.bert import Bert, init_params, layer_projections, unshare_layers
from tests.helpers import tiny_config

B, L, H = 3, 6, 8


def token_mask() -> jax.Array:
    lengths = jnp.array([6, 4, 2])
    return (jnp.arange(L)[None, :] < lengths[:, None]).astype(jnp.float32)


def probs(z: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention-like rows (B, N, L, L): softmax over real keys only."""
    return jax.nn.softmax(jnp.where(mask[:, None, None, :] > 0, z, -1e9), axis=-1)


def random(seed: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


EXAMPLES = jnp.ones((B,))
# name -> (loss of a student x given teacher t, shape of x); every loss is zero at x = t.
LOSSES = {
    "soft_cross_entropy": (lambda x, t: distill.soft_cross_entropy(x, t, EXAMPLES, 2.0), (B, 3)),
    "logit_mse": (lambda x, t: distill.logit_mse(x, t, EXAMPLES), (B, 3)),
    "hidden_mse": (lambda x, t: distill.hidden_mse(x, t, token_mask()), (B, L, H)),
    "hidden_cosine": (lambda x, t: distill.hidden_cosine(x, t, token_mask()), (B, L, H)),
    "patient": (lambda x, t: distill.patient_loss([x, x * 2], [t, t * 2], EXAMPLES), (B, H)),
    "attention_kl": (
        lambda x, t: distill.attention_kl(
            probs(x, token_mask()), probs(t, token_mask()), token_mask()
        ),
        (B, 2, L, L),
    ),
    "relation_kl": (lambda x, t: distill.relation_kl(x, t, 2, token_mask()), (B, L, H)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_is_zero_at_the_teacher_and_descends_towards_it(name):
    loss, shape = LOSSES[name]
    teacher = random(0, shape)
    assert abs(float(loss(teacher, teacher))) < 1e-6
    student = teacher + 0.3 * random(1, shape)
    value, grad = jax.value_and_grad(loss)(student, teacher)
    assert float(value) > 1e-4
    assert np.all(np.isfinite(grad))
    # The gradient has the right sign: a small step against it lowers the loss.
    step = 1e-2 / max(float(jnp.linalg.norm(grad)), 1e-12)
    assert float(loss(student - step * grad, teacher)) < float(value)
    # ... and the teacher side gets no gradient.
    assert not np.any(jax.grad(loss, argnums=1)(student, teacher))


def test_padding_does_not_change_token_losses():
    mask = token_mask()
    t, s = random(0, (B, L, H)), random(1, (B, L, H))
    garbage = jnp.where(mask[..., None] > 0, 0.0, 100.0 * random(2, (B, L, H)))
    for fn in (distill.hidden_mse, distill.hidden_cosine):
        np.testing.assert_allclose(fn(s + garbage, t, mask), fn(s, t, mask), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        distill.relation_kl(s + garbage, t, 2, mask),
        distill.relation_kl(s, t, 2, mask),
        rtol=1e-5,
        atol=1e-7,
    )
    # An all-padding row (a batch's filler example) stays finite in value and gradient.
    empty = mask.at[2].set(0.0)
    grad = jax.grad(lambda x: distill.relation_kl(x, t, 2, empty))(s)
    assert np.all(np.isfinite(grad))


def test_example_mask_is_optional_and_defaults_to_every_example():
    s, t = random(0, (B, 3)), random(1, (B, 3))
    ones = jnp.ones(B)
    for fn in (distill.logit_mse, distill.soft_cross_entropy):
        np.testing.assert_allclose(fn(s, t), fn(s, t, ones), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        distill.soft_cross_entropy(s, t, temperature=2.0),
        distill.soft_cross_entropy(s, t, ones, 2.0),
        rtol=1e-6,
        atol=1e-7,
    )
    cls_s, cls_t = [random(2, (B, H))], [random(3, (B, H))]
    np.testing.assert_allclose(
        distill.patient_loss(cls_s, cls_t), distill.patient_loss(cls_s, cls_t, ones), atol=1e-6
    )


def test_projection_and_relation_heads_bridge_different_widths():
    student, teacher = random(0, (B, L, 6)), random(1, (B, L, H))
    projection = jnp.eye(6, H)
    assert distill.project(student, projection).shape == (B, L, H)
    assert np.isfinite(float(distill.hidden_mse(student, teacher, token_mask(), projection)))
    with pytest.raises(TypeError):  # no projection: widths must match
        distill.hidden_mse(student, teacher, token_mask())
    # Self-relations compare (B, R, L, L) maps, whatever the widths.
    assert distill.self_relation(student, 2, token_mask()).shape == (B, 2, L, L)
    assert float(distill.relation_kl(student, teacher, 2, token_mask())) > 0
    with pytest.raises(ValueError, match="relation heads"):
        distill.self_relation(student, 4, token_mask())
    with pytest.raises(ValueError, match="head counts"):
        distill.attention_kl(jnp.ones((B, 2, L, L)), jnp.ones((B, 4, L, L)), token_mask())


def test_layer_maps():
    assert distill.layer_map("uniform", 3, 6) == (2, 4, 6)
    assert distill.layer_map("uniform", 4, 6) == (2, 3, 4, 6)
    assert distill.layer_map("skip", 2, 6) == (3, 6)
    assert distill.layer_map("skip", 2, 6, k=2) == (2, 4)
    assert distill.layer_map("last", 2, 6) == (5, 6)
    assert distill.layer_map([1, 5], 2, 6) == (1, 5)
    with pytest.raises(ValueError, match="2 entries for 3"):
        distill.layer_map([1, 5], 3, 6)
    with pytest.raises(ValueError, match="outside 1..6"):
        distill.layer_map([0, 7], 2, 6)
    with pytest.raises(ValueError, match="layer map"):
        distill.layer_map("middle", 2, 6)


# ---------------------------------------------------------------------------------------------
# The combined objective on tiny models


def batch_of(config, seed=0):
    ids = jax.random.randint(jax.random.key(seed), (4, 10), 1, config.vocab_size)
    mask = jnp.ones((4, 10), jnp.int32).at[1, 6:].set(0).at[3, 3:].set(0)
    return {
        "input_ids": ids * mask,
        "token_type_ids": jnp.zeros_like(ids),
        "attention_mask": mask,
        "labels": jnp.array([0, 1, 1, 0]),
        "example_mask": jnp.array([1.0, 1.0, 1.0, 0.0]),
    }


EVERYTHING = objectives.Objective(
    alpha=1.0, hidden=1.0, embedding=1.0, attention=1.0, patient=1.0, relation=1.0
)


def test_student_equal_to_teacher_has_zero_distillation_terms():
    config = tiny_config(num_labels=2, num_hidden_layers=3)
    params = init_params(config, jax.random.key(0))
    batch = batch_of(config)
    for objective in (EVERYTHING, objectives.Objective(relation=1.0, relation_heads=2)):
        model = Bert(config)
        loss_fn = objectives.make_loss(model, objective, model)
        _, terms = loss_fn(params, batch, None, params)
        for name in ("kd", "hidden", "embedding", "attention", "patient", "relation"):
            if f"{name}_loss" in terms:
                assert abs(float(terms[f"{name}_loss"])) < 1e-5, name
        assert "relation_loss" in terms


@pytest.mark.slow
def test_narrower_shallower_student_trains_its_projections():
    teacher_config = tiny_config(num_labels=2, num_hidden_layers=4)
    student_config = tiny_config(num_labels=2, num_hidden_layers=2, hidden_size=16)
    student = init_params(student_config, jax.random.key(1))
    projections = objectives.init_distill_params(EVERYTHING, student_config, teacher_config)
    assert {k: v.shape for k, v in projections.items()} == {
        "hidden": (16, 32),
        "embedding": (16, 32),
    }
    objective = objectives.Objective(alpha=1.0, hidden=1.0, embedding=1.0, patient=1.0)
    teacher = Bert(teacher_config)
    loss_fn = objectives.make_loss(Bert(student_config), objective, teacher)
    params = {**student, objectives.DISTILL_PARAMS: projections}
    teacher_params = init_params(teacher_config, jax.random.key(0))
    (loss, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch_of(student_config), jax.random.key(2), teacher_params
    )
    assert np.isfinite(float(loss)) and set(terms) >= {"hidden_loss", "embedding_loss"}
    assert float(jnp.abs(grads[objectives.DISTILL_PARAMS]["hidden"]).sum()) > 0
    assert objectives.model_params(params).keys() == student.keys()
    # Attention transfer needs equal heads; the error names the way out.
    fewer_heads = student_config.replace(num_attention_heads=2, head_size=8)
    with pytest.raises(ValueError, match="relation_heads > 0"):
        objectives.make_loss(Bert(fewer_heads), objectives.Objective(attention=1.0), teacher)


def test_cached_teacher_logits_give_the_same_loss():
    config = tiny_config(num_labels=2)
    teacher_params = init_params(config, jax.random.key(0))
    student_params = init_params(config, jax.random.key(1))
    batch = batch_of(config)
    loss_fn = objectives.make_loss(Bert(config), objectives.Objective(), Bert(config))
    live, _ = loss_fn(student_params, batch, None, teacher_params)
    logits = (
        Bert(config)
        .apply(
            {"params": teacher_params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
        )
        .logits
    )
    cached, _ = loss_fn(student_params, {**batch, "teacher_logits": logits}, None, None)
    np.testing.assert_allclose(cached, live, rtol=1e-6, atol=1e-6)


def test_layer_projections_of_a_scanned_model_match_the_unrolled_one():
    config = tiny_config(num_hidden_layers=3)
    params = init_params(config, jax.random.key(0))
    shared_config, shared = share.share_layers(
        config, params, attention_groups=(0, 0, 0), ffn_groups=(0, 0, 0)
    )
    unrolled_config, unrolled = unshare_layers(shared_config, shared)
    batch = batch_of(config)

    def qkv(cfg, p):
        _, state = Bert(cfg).apply(
            {"params": p}, batch["input_ids"], batch["attention_mask"], mutable=["intermediates"]
        )
        return layer_projections(cfg, state["intermediates"])

    scanned, plain = qkv(shared_config, shared), qkv(unrolled_config, unrolled)
    assert len(scanned) == 3 and scanned[0]["values"].shape == (4, 10, 32)
    for a, b in zip(scanned, plain, strict=True):
        for name in ("queries", "keys", "values"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-5)
