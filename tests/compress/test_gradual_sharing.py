"""Gradual sharing: the blend schedule, the tied end state, its artefact and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxcompress import core
from jaxcompress.compress import gradual_sharing as gradual
from jaxcompress.compress import share
from jaxcompress.config import finetune_defaults
from tests.conformance_cases import logits, model_and_batch
from tests.foreign_models import foreign

RULES = ((r"bert/encoder/layer/\d+/.*", True), (".*", None))
QUERY = "bert/encoder/layer/{}/attention/self/query/kernel"


def _leaf(params, path):
    return core.leaves_by_path(params)[path]


def test_layers_blend_linearly_into_their_group_mean():
    _, params, _ = model_and_batch(layers=3)
    reparam = gradual.gradual_sharing(RULES, "all", begin_step=2, end_step=6)
    state = reparam.init(params)
    jax.tree.map(np.testing.assert_array_equal, reparam.apply(params, state), params)
    mean = sum(_leaf(params, QUERY.format(i)) for i in range(3)) / 3
    apply = jax.jit(reparam.apply)  # one program for every blend, not one per op
    for step, blend in ((2, 0.0), (4, 0.5), (5, 0.75), (6, 1.0), (9, 1.0)):
        state = reparam.update(params, state, step)
        seen = apply(params, state)
        for i in range(3):
            own = _leaf(params, QUERY.format(i))
            expected = (1 - blend) * own + blend * mean
            np.testing.assert_allclose(_leaf(seen, QUERY.format(i)), expected, atol=1e-7)
    # Not per-layer leaves: the embeddings and classifier are never touched.
    np.testing.assert_array_equal(
        seen["bert"]["embeddings"]["word_embeddings"],
        params["bert"]["embeddings"]["word_embeddings"],
    )


def test_groups_every_k_share_within_runs_of_k():
    _, params, _ = model_and_batch(layers=3)
    groups = gradual.layer_groups(params, RULES, "every:2")
    query = [g for g in groups if g[0] == QUERY.format(0)]
    assert query == [[QUERY.format(0), QUERY.format(1)]]  # layer 2 is alone: not blended
    assert all(QUERY.format(2) not in g for g in groups)
    assert gradual.layer_groups(params, RULES, "every:1") == []


def test_finished_blend_ties_exactly_and_equals_albert_sharing(tmp_path):
    config, params, batch = model_and_batch(layers=3)
    reparam = gradual.gradual_sharing(RULES, "all", begin_step=0, end_step=0)
    seen = reparam.apply(params, reparam.init(params))
    for i in (1, 2):
        np.testing.assert_array_equal(_leaf(seen, QUERY.format(i)), _leaf(seen, QUERY.format(0)))
    # The exported artefact stores one layer and loads back to the same model.
    members = gradual.layer_groups(seen, RULES, "all")
    path = gradual.save_tied(tmp_path / "shared" / "params.safetensors", seen, members)
    jax.tree.map(np.testing.assert_array_equal, gradual.load_tied(path), seen)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(seen["bert"]["encoder"]["layer"]["0"]))
    full = sum(x.nbytes for x in jax.tree.leaves(seen))
    stored = sum(x.nbytes for x in load_file(path).values())
    assert stored == full - 2 * layer_bytes  # two of three layers not stored
    # ALBERT's structural sharing of the blended model computes the same logits.
    shared_config, shared_params = share.share_layers(
        config, seen, attention_groups=(0, 0, 0), ffn_groups=(0, 0, 0)
    )
    np.testing.assert_allclose(
        logits(shared_config, shared_params, batch), logits(config, seen, batch), atol=1e-5
    )


def test_gradients_of_the_shared_end_state_are_the_layer_mean():
    rng = np.random.default_rng(0)
    params = {"stack": {str(i): {"w": jnp.asarray(rng.normal(size=(3, 2)))} for i in range(3)}}
    inputs = [jnp.asarray(rng.normal(size=(4, 3))) for _ in range(3)]
    rules = ((r"stack/\d+/w", True),)  # every leaf
    reparam = gradual.gradual_sharing(rules, "all", begin_step=0, end_step=0)
    state = reparam.init(params)

    def loss(p):  # each layer's own input, so the layers' gradients differ
        return sum(
            jnp.sum(jnp.tanh(x @ p["stack"][str(i)]["w"]) ** 2) for i, x in enumerate(inputs)
        )

    grads = jax.grad(lambda p: loss(reparam.apply(p, state)))(params)
    per_layer = jax.grad(loss)(reparam.apply(params, state))
    mean = sum(per_layer["stack"][str(i)]["w"] for i in range(3)) / 3
    assert not np.allclose(per_layer["stack"]["0"]["w"], per_layer["stack"]["1"]["w"])
    for i in range(3):
        np.testing.assert_allclose(grads["stack"][str(i)]["w"], mean, rtol=1e-5, atol=1e-7)


def test_bad_sections_and_trees_fail_with_the_key():
    cfg = finetune_defaults().share
    assert gradual.parse(cfg) is None
    with cfg.unlocked():
        cfg.groups = "every:0"
    with pytest.raises(ValueError, match="share.groups must be 'all' or 'every:K'"):
        gradual.parse(cfg)
    with cfg.unlocked():
        cfg.groups, cfg.begin, cfg.end = "all", 0.6, 0.2
    with pytest.raises(ValueError, match="begin <= end"):
        gradual.parse(cfg)
    _, params, _ = model_and_batch(layers=3)
    no_index = ((r"bert/embeddings/.*", True), (".*", None))
    with pytest.raises(ValueError, match="has no layer index"):
        gradual.layer_groups(params, no_index, "all")
    with pytest.raises(ValueError, match="begin_step <= end_step"):
        gradual.gradual_sharing(RULES, "all", begin_step=3, end_step=1)


def test_an_nnx_model_blends_its_layers_and_keeps_its_state_type():
    m = foreign("nnx_mlp")  # layers/0 and layers/1: two 16 x 16 Linear layers
    rules = ((r"layers/\d+/.*", True), (".*", None))
    reparam = gradual.gradual_sharing(rules, "all", begin_step=0, end_step=0)
    seen = reparam.apply(m.params, reparam.init(m.params))
    assert isinstance(seen, nnx.State)
    flat, base = core.leaves_by_path(seen), core.leaves_by_path(m.params)
    for leaf in ("kernel", "bias"):
        mean = (base[f"layers/0/{leaf}"] + base[f"layers/1/{leaf}"]) / 2
        for i in (0, 1):
            np.testing.assert_allclose(flat[f"layers/{i}/{leaf}"], mean, rtol=1e-6, atol=1e-7)
    tied, shared = share.tie(seen, [["layers/0", "layers/1"]], init="first")
    np.testing.assert_allclose(
        m.apply(seen, m.x), m.apply(share.expand(tied, shared), m.x), rtol=1e-6, atol=1e-6
    )
