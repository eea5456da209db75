"""Structured pruning: gate-gradient importance, exact masks, shrinking equals the masked parent."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.compress.distill.objective import forward, task_loss
from jaxcompress.compress.prune import structured
from jaxcompress.core import path_str
from jaxcompress.models import artefact
from jaxcompress.models.bert import Bert, abstract_params
from jaxcompress.models.hf import save_pretrained
from jaxcompress.train.loop import train
from tests.helpers import tiny_config, tiny_model_run_config

LAYER = "bert/encoder/layer/"
CONFIG = tiny_config(num_labels=2)  # 2 layers, 4 heads of 8, FFN 64
# One layer without heads, one without FFN neurons: the model runs with zero widths.
ZERO_HEADS = np.array([[False] * 4, [True, False, True, False]])
ZERO_FFN = np.stack([np.arange(64) % 2 == 0, np.zeros(64, bool)])


def _params(config, seed: int = 0) -> dict:
    """Random parameters drawn with numpy (nothing to compile); biases and LayerNorms non-zero,
    so that a wrongly kept or dropped bias column shows."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path_str(path).endswith("scale"):
            return jnp.asarray(1 + 0.1 * noise)
        return jnp.asarray((0.05 if leaf.ndim == 1 else 0.1) * noise)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


def _batches(n: int = 3, seed: int = 0, size: int = 4, length: int = 7):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((size, length), np.int32)
        mask[0, length - 2 :] = 0
        out.append(
            {
                "input_ids": rng.integers(1, 1000, (size, length)).astype(np.int32) * mask,
                "attention_mask": mask,
                "token_type_ids": np.zeros((size, length), np.int32),
                "labels": rng.integers(0, 2, size).astype(np.int32),
                "example_mask": np.ones(size, np.float32),
            }
        )
    return out


@pytest.fixture(scope="module")
def params():
    return _params(CONFIG)


@pytest.fixture(scope="module")
def task_grads():
    """One compiled gradient for the whole module (it is cached per config)."""
    return structured.task_gradient_fn(_batches(3))


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, batch):
    out = forward(Bert(config), params, batch, None)
    return out.logits, out.last_hidden_state


def _outputs(config, params, seed: int = 5):
    return tuple(np.asarray(x) for x in _apply(config, params, _batches(1, seed=seed)[0]))


def _sizes(config, kind):
    size = config.layer_heads if kind == "heads" else config.layer_intermediate
    return [size(i) for i in range(config.num_hidden_layers)]


def _random_importance(config, kind, seed=0):
    sizes = _sizes(config, kind)
    imp = np.random.default_rng(seed).random((len(sizes), max(sizes)))
    return np.where(np.arange(max(sizes)) < np.array(sizes)[:, None], imp, np.nan)


def _assert_shrink_matches_mask(config, params, head_keep, ffn_keep):
    masked = structured.apply_structured_mask(config, params, head_keep, ffn_keep)
    small_config, small = structured.shrink(config, params, head_keep, ffn_keep)
    parent = _outputs(config, masked)
    for ours, theirs in zip(_outputs(small_config, small), parent, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    # Not vacuous: the pruning changed the function.
    assert np.abs(_outputs(config, params)[1] - parent[1]).max() > 1e-2
    return small_config, small


def _check_shapes(small_config, small):
    flat = flatten_dict(small, sep="/")
    heads, widths = _sizes(small_config, "heads"), _sizes(small_config, "ffn")
    for i in range(small_config.num_hidden_layers):
        prefix = f"{LAYER}{i}/"
        assert flat[prefix + "attention/self/key/kernel"].shape == (32, heads[i] * 8)
        assert flat[prefix + "attention/self/query/bias"].shape == (heads[i] * 8,)
        assert flat[prefix + "attention/output/dense/kernel"].shape == (heads[i] * 8, 32)
        assert flat[prefix + "intermediate/dense/bias"].shape == (widths[i],)
        assert flat[prefix + "output/dense/kernel"].shape == (widths[i], 32)


def _masks(config, scope="global"):
    head_keep = structured.head_mask(_random_importance(config, "heads", 1), 0.5, scope)
    ffn_keep = structured.neuron_mask(_random_importance(config, "ffn", 2), 0.25, scope)
    return head_keep, ffn_keep


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_shrink_equals_masked_parent(params, scope):
    head_keep, ffn_keep = _masks(CONFIG, scope)
    small_config, small = _assert_shrink_matches_mask(CONFIG, params, head_keep, ffn_keep)
    assert small_config.heads_per_layer == tuple(head_keep.sum(1).tolist())
    assert small_config.intermediate_per_layer == tuple(ffn_keep.sum(1).tolist())
    assert sum(small_config.heads_per_layer) == 4 and sum(small_config.intermediate_per_layer) == 96
    expected = {"global": ((3, 1), (49, 47)), "layer": ((2, 2), (48, 48))}[scope]
    assert (small_config.heads_per_layer, small_config.intermediate_per_layer) == expected
    _check_shapes(small_config, small)


def test_shrink_an_already_pruned_model(params):
    pruned_config, pruned = structured.shrink(CONFIG, params, *_masks(CONFIG))  # (3, 1) heads
    # Importance of an uneven model: NaN where a layer has no such head.
    ones = jax.tree_util.tree_map(jnp.ones_like, pruned)
    gate = structured.gate_gradients(pruned_config, pruned, ones, "heads")
    assert gate.shape == (2, 3) and np.isnan(gate[1, 1:]).all()
    kernel = np.asarray(flatten_dict(pruned, sep="/")[f"{LAYER}0/attention/output/dense/kernel"])
    np.testing.assert_allclose(gate[0], kernel.reshape(3, -1).sum(1), rtol=1e-6, atol=1e-6)
    head_keep, ffn_keep = _masks(pruned_config)
    assert head_keep.shape == (2, 3) and not head_keep[1, 1:].any()
    assert ffn_keep.shape == (2, 49) and not ffn_keep[1, 47:].any()
    small_config, small = _assert_shrink_matches_mask(pruned_config, pruned, head_keep, ffn_keep)
    assert sum(small_config.heads_per_layer) == 2  # round(0.5 * 4) removed
    assert sum(small_config.intermediate_per_layer) == 96 - 24
    _check_shapes(small_config, small)


def test_shrink_to_zero_heads_and_neurons_and_masked_parent_is_clean(params):
    small_config, small = _assert_shrink_matches_mask(CONFIG, params, ZERO_HEADS, ZERO_FFN)
    assert small_config.heads_per_layer == (0, 2)
    assert small_config.intermediate_per_layer == (32, 0)
    _check_shapes(small_config, small)
    flat, original = flatten_dict(small, sep="/"), flatten_dict(params, sep="/")
    # The kept heads are heads 0 and 2 of layer 1, in order; the kept neurons the even ones.
    value = f"{LAYER}1/attention/self/value/kernel"
    np.testing.assert_array_equal(
        flat[value], np.concatenate([original[value][:, 0:8], original[value][:, 16:24]], axis=1)
    )
    out = f"{LAYER}0/output/dense/kernel"
    np.testing.assert_array_equal(flat[out], original[out][::2])
    masked = flatten_dict(structured.apply_structured_mask(CONFIG, params, ZERO_HEADS), sep="/")
    for name in ("query/kernel", "key/bias", "value/kernel", "value/bias"):
        assert not np.any(masked[f"{LAYER}0/attention/self/{name}"])
    assert np.count_nonzero(masked[f"{LAYER}1/attention/self/query/bias"]) == 16
    assert not np.any(masked[f"{LAYER}1/attention/output/dense/kernel"][8:16])
    assert np.all(masked[f"{LAYER}1/attention/output/dense/kernel"][16:24])
    # Keeping everything gives back the uniform config and the same parameters.
    same_config, same = structured.shrink(CONFIG, params, np.ones((2, 4), bool))
    assert same_config == CONFIG
    for path, value in flatten_dict(same, sep="/").items():
        np.testing.assert_array_equal(value, original[path], err_msg=path)


def _damage(params, path, rows, factor):
    flat = flatten_dict(params, sep="/")
    flat[path] = flat[path].at[rows].multiply(factor)
    return unflatten_dict(flat, sep="/")


def test_importance_ranks_a_damaged_head_and_neuron_lowest(params, task_grads):
    params = _damage(params, f"{LAYER}1/attention/output/dense/kernel", slice(16, 24), 1e-3)
    params = _damage(params, f"{LAYER}0/output/dense/kernel", 17, 1e-3)
    heads = structured.accumulate_importance(CONFIG, params, task_grads(CONFIG, params), "heads")
    ffn = structured.accumulate_importance(CONFIG, params, task_grads(CONFIG, params), "ffn")
    assert heads.shape == (2, 4) and ffn.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(heads, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(ffn, axis=1), 1.0, rtol=1e-12)
    assert np.unravel_index(np.argmin(heads), heads.shape) == (1, 2)
    assert heads[1, 2] < 0.01 * np.median(heads)
    assert np.unravel_index(np.argmin(ffn), ffn.shape) == (0, 17)
    assert ffn[0, 17] < 0.01 * np.median(ffn[0])
    assert np.argwhere(~structured.head_mask(heads, 1 / 8)).tolist() == [[1, 2]]
    assert np.argwhere(~structured.neuron_mask(ffn, 1 / 128)).tolist() == [[0, 17]]


def test_gate_gradient_equals_gradient_of_an_explicit_gate(params, task_grads):
    """sum(W * dL/dW) over a unit's rows is dL/dxi for a gate xi scaling those rows."""
    batch = _batches(3)[0]  # the first of task_grads' batches

    def gated(xi_heads, xi_ffn):
        flat = flatten_dict(params, sep="/")
        for i in range(2):
            attn, ffn = (
                f"{LAYER}{i}/attention/output/dense/kernel",
                f"{LAYER}{i}/output/dense/kernel",
            )
            flat[attn] = flat[attn] * jnp.repeat(xi_heads[i], 8)[:, None]
            flat[ffn] = flat[ffn] * xi_ffn[i][:, None]
        out = forward(Bert(CONFIG), unflatten_dict(flat, sep="/"), batch, None)
        return task_loss(out.logits, batch["labels"], batch["example_mask"])

    expected = jax.jit(jax.grad(gated, argnums=(0, 1)))(jnp.ones((2, 4)), jnp.ones((2, 64)))
    grads = next(iter(task_grads(CONFIG, params)))
    for kind, want in zip(structured.KINDS, expected, strict=True):
        ours = structured.gate_gradients(CONFIG, params, grads, kind)
        np.testing.assert_allclose(ours, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    raw = structured.head_importance(CONFIG, params, grads, normalize=False)
    np.testing.assert_allclose(raw, np.abs(expected[0]), rtol=1e-3, atol=1e-4 * raw.max())
    normalized = structured.ffn_importance(CONFIG, params, grads)
    want = np.abs(expected[1]) / np.linalg.norm(expected[1], axis=1, keepdims=True)
    np.testing.assert_allclose(normalized, want, rtol=1e-3, atol=1e-4)
    # Summing |per-batch gate gradient|: two copies of one batch give twice the score.
    twice = structured.accumulate_importance(CONFIG, params, [grads, grads], normalize=False)
    np.testing.assert_allclose(twice, 2 * raw, rtol=1e-12)


def test_masks_remove_exactly_the_requested_count():
    imp = np.array(
        [
            [0.5, 0.1, 0.9, 0.3, 0.7],
            [0.2, 0.8, np.nan, np.nan, np.nan],  # an already-pruned layer: 2 heads
            [0.05, 0.04, 0.03, 0.6, 0.4],
        ]
    )
    keep = structured.head_mask(imp, 0.5)  # round(0.5 * 12) = 6 lowest
    assert (~keep & ~np.isnan(imp)).sum() == 6
    assert not keep[1, 2:].any()
    np.testing.assert_array_equal(
        np.argwhere(~keep[[0, 2]]), [[0, 1], [0, 3], [1, 0], [1, 1], [1, 2]]
    )
    assert keep[1].tolist() == [False, True, False, False, False]
    per_layer = structured.head_mask(imp, 0.4, scope="layer")  # 2, 1, 2 removed
    assert (~per_layer & ~np.isnan(imp)).sum(1).tolist() == [2, 1, 2]
    assert per_layer[2].tolist() == [True, False, False, True, True]
    assert keep.sum(1).tolist() == [3, 1, 2]
    # min_per_layer=2: layer 1 (2 heads) loses none, layer 2 stops at 2, so the next lowest
    # elsewhere (0.5 in layer 0) goes instead.
    floor = structured.head_mask(imp, 0.5, min_per_layer=2)
    assert floor.sum(1).tolist() == [2, 2, 2]
    assert floor[0].tolist() == [False, False, True, False, True]
    # Ties: the lowest index goes first.
    assert structured.neuron_mask(np.zeros((2, 4)), 0.25).tolist() == [
        [False, False, True, True],
        [True, True, True, True],
    ]
    assert structured.neuron_mask(np.zeros((2, 4)), 0.375, scope="layer").sum() == 4
    assert structured.neuron_mask(np.zeros((1, 3)), 1.0).sum() == 0
    assert structured.neuron_mask(np.zeros((1, 3)), 0.0).sum() == 3


@pytest.mark.parametrize("fraction", [-0.1, 1.5, "half", None])
def test_bad_fraction_is_an_error(fraction):
    with pytest.raises(ValueError, match="fraction must be a number in"):
        structured.head_mask(np.zeros((2, 4)), fraction)
    with pytest.raises(ValueError, match="fraction must be a number in"):
        structured.prune_heads(fraction, gradient_fn=lambda c, p: [])


@pytest.mark.parametrize("prune", [structured.prune_heads, structured.prune_ffn])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_fraction_zero_is_an_exact_no_op(params, prune, scope):
    def gradient_fn(config, p):
        raise AssertionError("nothing to remove: no importance needed")

    same_config, same = prune(0.0, scope, steps=2, gradient_fn=gradient_fn)(CONFIG, params)
    assert same_config == CONFIG
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(params)
    # The very same arrays: no host copy, so a sharded model keeps its placement.
    leaves, original = jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params)
    assert all(a is b for a, b in zip(leaves, original, strict=True))


def test_bad_mask_arguments_are_errors(params):
    with pytest.raises(ValueError, match="scope must be one of"):
        structured.neuron_mask(np.zeros((2, 4)), 0.5, scope="model")
    with pytest.raises(ValueError, match="min_per_layer=2"):
        structured.head_mask(np.zeros((2, 4)), 0.75, min_per_layer=2)
    with pytest.raises(ValueError, match="layer 0: removing 3 of 4"):
        structured.head_mask(np.zeros((2, 4)), 0.75, scope="layer", min_per_layer=2)
    with pytest.raises(ValueError, match=r"heads keep mask must be bool \(2, 4\)"):
        structured.shrink(CONFIG, params, np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        structured.prune_ffn(0.5, steps=0, gradient_fn=lambda c, p: [])


def test_shared_and_low_rank_layers_are_errors(params):
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    shared = tiny_config(num_labels=2, attention_groups=(0, 0))
    with pytest.raises(ValueError, match="needs unshared layers; config.attention_groups"):
        structured.head_importance(shared, params, grads)
    with pytest.raises(ValueError, match="config.attention_groups"):
        structured.iterative_prune(shared, params, lambda c, p: [grads], 0.5)
    ffn_shared = tiny_config(num_labels=2, ffn_groups=(0, 0))
    with pytest.raises(ValueError, match="config.ffn_groups"):
        structured.shrink(ffn_shared, params, ffn_keep=np.ones((2, 64), bool))
    low_path = f"{LAYER}1/attention/self/value"
    low_rank = tiny_config(num_labels=2, low_rank=((low_path, 4),))
    with pytest.raises(ValueError, match=f"{low_path} is low-rank"):
        structured.head_importance(low_rank, params, grads)
    with pytest.raises(ValueError, match=f"{low_path} is low-rank"):
        structured.apply_structured_mask(low_rank, params, np.ones((2, 4), bool))
    # The FFN of that model is dense, so its neurons can be scored.
    assert structured.ffn_importance(low_rank, params, grads).shape == (2, 64)
    with pytest.raises(ValueError, match="no gradient batches"):
        structured.accumulate_importance(CONFIG, params, [])


def test_shrunk_model_loads_in_transformers_with_same_logits(params, tmp_path, minilm_dir):
    torch = pytest.importorskip("torch")
    from transformers import BertForSequenceClassification

    small_config, small = structured.shrink(CONFIG, params, ZERO_HEADS, ZERO_FFN)
    out = save_pretrained(small_config, small, tmp_path / "pruned", tokenizer_dir=minilm_dir)
    assert (out / "tokenizer.json").exists()
    reference = BertForSequenceClassification.from_pretrained(out).eval()
    ids = np.array([[101, 2023, 3185, 2001, 2307, 102], [101, 6659, 102, 0, 0, 0]])
    mask = (ids > 0).astype(np.int32)
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask}
    batch["token_type_ids"] = np.zeros_like(mask)
    ours = np.asarray(_apply(small_config, small, batch)[0])
    assert np.abs(ours).max() > 1e-2  # not a trivially zero output
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4, rtol=0)


def test_iterative_prune_reaches_target_on_masked_models(params, task_grads):
    seen = []

    def gradient_fn(config, p):
        flat = flatten_dict(p, sep="/")
        seen.append(
            [
                not np.any(flat[f"{LAYER}{i}/attention/output/dense/kernel"][h * 8 : (h + 1) * 8])
                for i in range(2)
                for h in range(4)
            ]
        )
        return task_grads(config, p)

    keep = structured.iterative_prune(CONFIG, params, gradient_fn, 0.75, "heads", steps=3)
    assert (~keep).sum() == 6  # 2 per step
    assert [sum(s) for s in seen] == [0, 2, 4]  # each step scores the model masked so far
    assert not keep.ravel()[np.array(seen[2])].any()  # removed heads stay removed
    one_shot = structured.iterative_prune(CONFIG, params, task_grads, 0.75, "heads")
    importance = structured.accumulate_importance(CONFIG, params, task_grads(CONFIG, params))
    np.testing.assert_array_equal(one_shot, structured.head_mask(importance, 0.75))

    ffn_keep = structured.iterative_prune(
        CONFIG, params, task_grads, 0.5, "ffn", steps=2, scope="layer"
    )
    assert (~ffn_keep).sum(1).tolist() == [32, 32]

    transform = structured.prune_heads(0.75, steps=3, gradient_fn=task_grads)
    small_config, small = transform(CONFIG, params)
    assert small_config.heads_per_layer == tuple(keep.sum(1).tolist())
    masked = structured.apply_structured_mask(CONFIG, params, head_keep=keep)
    np.testing.assert_allclose(
        _outputs(small_config, small)[0], _outputs(CONFIG, masked)[0], atol=1e-5, rtol=0
    )
    ffn_config, _ = structured.prune_ffn(0.5, scope="layer", gradient_fn=task_grads)(CONFIG, params)
    assert ffn_config.intermediate_per_layer == (32, 32)


@pytest.mark.slow
def test_structured_transforms_in_a_training_run(tmp_path, minilm_dir, glue_dir):
    """Heads, FFN neurons and layers removed by data-driven transforms before fine-tuning:
    the run keeps the shrunk shapes (native artefact) and still exports to Hugging Face."""
    config = tiny_model_run_config(tmp_path, minilm_dir, glue_dir, steps=2)
    with config.unlocked():
        config.context_batches = 1
        config.transforms = (
            "keep_layers(keep=1, strategy='contribution')",
            "prune_heads(fraction=0.5)",
            "prune_ffn(fraction=0.25, scope='layer')",
        )
    summary = train(config, tmp_path / "run")
    shrunk, params = artefact.load(tmp_path / "run" / "compressed")
    teacher = tiny_config()
    assert shrunk.num_hidden_layers == 1
    assert sum(shrunk.heads_per_layer) == teacher.num_attention_heads // 2
    assert shrunk.intermediate_per_layer == (round(0.75 * teacher.intermediate_size),)
    assert summary["params"] == artefact.count_params(params)
    assert 0.0 <= summary["value"] <= 1.0
