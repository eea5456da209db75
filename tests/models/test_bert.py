"""The Flax BERT: parity with Hugging Face PyTorch, compressed shapes, axes, dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxcompress.models.bert import (
    Bert,
    BertConfig,
    init_params,
    layer_projections,
    param_logical_axes,
    scans_every_layer,
)
from jaxcompress.models.hf import load_pretrained
from tests.helpers import compressed_tiny_config, tiny_config

SENTENCES = [
    "hide new secretions from the parental units",
    "the greatest musicians , the worst script and a plot you could drive a truck through .",
    "ok",
    "a gorgeous , witty , seductive movie .",
]


@pytest.fixture(scope="module")
def minilm_batch(minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))


@pytest.mark.slow
def test_minilm_matches_hugging_face_pytorch(minilm_dir, minilm_batch):
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    config, params = load_pretrained(minilm_dir)
    ours = Bert(config).apply(
        {"params": params},
        minilm_batch["input_ids"],
        minilm_batch["attention_mask"],
        minilm_batch["token_type_ids"],
    )
    reference = BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        theirs = reference(**{k: torch.tensor(v) for k, v in minilm_batch.items()})
    assert minilm_batch["attention_mask"].min() == 0  # the batch really has padding
    last = np.abs(np.asarray(ours.last_hidden_state) - theirs.last_hidden_state.numpy()).max()
    pooled = np.abs(np.asarray(ours.pooled_output) - theirs.pooler_output.numpy()).max()
    assert last < 1e-4
    assert pooled < 1e-4


def test_outputs_hidden_states_and_attentions():
    config = tiny_config(num_labels=3)
    params = init_params(config, jax.random.key(0))
    ids = jnp.ones((2, 7), jnp.int32)
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    out = Bert(config).apply(
        {"params": params}, ids, mask, output_hidden_states=True, output_attentions=True
    )
    assert out.logits.shape == (2, 3)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, 7, 32)
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 7, 7)
    # Padded keys get no attention; each row is a distribution.
    np.testing.assert_allclose(out.attentions[0].sum(-1), 1.0, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(out.attentions[1][1, :, :, 4:]).max()) == 0.0
    plain = Bert(config).apply({"params": params}, ids, mask)
    assert plain.hidden_states is None and plain.attentions is None


def test_padding_does_not_change_real_positions():
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (1, 5), 1, 1000)
    short = Bert(config).apply({"params": params}, ids)
    padded_ids = jnp.concatenate([ids, jnp.zeros((1, 3), jnp.int32)], axis=1)
    padded = Bert(config).apply({"params": params}, padded_ids, (padded_ids > 0).astype(jnp.int32))
    np.testing.assert_allclose(short.logits, padded.logits, atol=1e-5)
    np.testing.assert_allclose(short.last_hidden_state, padded.last_hidden_state[:, :5], atol=1e-5)


def test_dropout_uses_explicit_keys():
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    ids = jnp.ones((2, 6), jnp.int32)
    model = Bert(config)

    def run(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return model.apply({"params": params}, ids, deterministic=False, rngs=rngs).logits

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, ids, deterministic=False)


def test_compressed_shapes_are_expressible():
    config = compressed_tiny_config(num_labels=1)
    flat = {
        k: v.shape for k, v in flatten_dict(init_params(config, jax.random.key(0)), sep="/").items()
    }
    assert flat["bert/embeddings/word_embeddings"] == (30522, 8)
    assert flat["bert/embeddings/embedding_projection"] == (8, 32)
    assert flat["bert/encoder/layer/0/intermediate/dense/kernel_a"] == (32, 5)
    assert flat["bert/encoder/layer/0/intermediate/dense/kernel_b"] == (5, 64)
    assert flat["bert/encoder/layer/1/attention/self/query/kernel"] == (32, 16)  # 2 heads x 8
    assert flat["bert/encoder/layer/1/output/dense/kernel"] == (16, 32)
    assert "bert/encoder/layer/2/output/dense/kernel" not in flat  # layer 2 shares group 1
    assert flat["classifier/kernel"] == (32, 1)


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="heads_per_layer has 1 entries, expected 2"):
        tiny_config(heads_per_layer=(4,))
    with pytest.raises(ValueError, match="share attention group 0 but differ"):
        tiny_config(attention_groups=(0, 0), heads_per_layer=(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        tiny_config(dtype="float64")
    with pytest.raises(ValueError, match="not a multiple"):
        BertConfig(hidden_size=30, num_attention_heads=4)


def test_every_parameter_has_logical_axes():
    config = tiny_config(num_labels=2, embedding_size=8)
    axes = flatten_dict(param_logical_axes(config), sep="/")
    params = flatten_dict(init_params(config, jax.random.key(0)), sep="/")
    assert axes.keys() == params.keys()
    for path, spec in axes.items():
        assert len(spec) == params[path].ndim, path
        assert all(isinstance(name, str) for name in spec), path
    assert tuple(axes["bert/encoder/layer/0/intermediate/dense/kernel"]) == ("embed", "mlp")
    assert tuple(axes["bert/embeddings/word_embeddings"]) == ("vocab", "rank")


def test_bfloat16_compute_keeps_float32_params():
    config = tiny_config(num_labels=2, dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    out = Bert(config).apply({"params": params}, jnp.ones((2, 6), jnp.int32))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert out.logits.dtype == jnp.float32
    reference = Bert(tiny_config(num_labels=2)).apply(
        {"params": params}, jnp.ones((2, 6), jnp.int32)
    )
    np.testing.assert_allclose(out.logits, reference.logits, atol=0.05)


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "scanned"])
def test_fused_attention_equals_the_explicit_path(shared):
    """Without output_attentions, attention runs through jax.nn.dot_product_attention; with
    them, explicitly: same outputs and gradients, padding included, per-layer and scanned."""
    changes = {"attention_groups": (0, 0), "ffn_groups": (0, 0)} if shared else {}
    config = tiny_config(num_labels=2, **changes)
    params = init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (3, 9), 1, 1000)
    mask = jnp.array([[1] * 9, [1] * 5 + [0] * 4, [0] * 9])  # the last: a padding row

    # jitted: eager dispatch of each small op costs more than one compile here
    @functools.partial(jax.jit, static_argnums=1)
    def logits(p, explicit):
        out = Bert(config).apply({"params": p}, ids, mask, output_attentions=explicit)
        assert (out.attentions is None) != explicit
        return out.logits

    fused, explicit = logits(params, False), logits(params, True)
    assert np.all(np.isfinite(fused))  # the padding row too: its output is not used
    np.testing.assert_allclose(fused[:2], explicit[:2], rtol=1e-5, atol=1e-6)
    grads = [
        jax.jit(jax.grad(lambda p, e=e: jnp.sum(logits(p, e)[:2] ** 2)))(params) for e in (0, 1)
    ]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf16 = Bert(config.replace(dtype="bfloat16"))
    outs = [
        jax.jit(lambda p, e=e: bf16.apply({"params": p}, ids, mask, output_attentions=e).logits)(
            half
        )
        for e in (False, True)
    ]
    np.testing.assert_allclose(outs[0][:2], outs[1][:2], atol=2e-2)


def test_a_scanned_stack_equals_the_per_layer_one():
    """scan_layers: one nn.scan over the layers, parameters still stored per layer; the same
    tree, axes, outputs, attentions, projections and gradients as the per-layer stack."""
    config = tiny_config(num_labels=2, num_hidden_layers=3)
    scanned = config.replace(scan_layers=True)
    assert scans_every_layer(scanned) and not scans_every_layer(config)
    assert not scans_every_layer(scanned.replace(heads_per_layer=(4, 2, 4)))
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    fresh = jax.eval_shape(lambda key: init_params(scanned, key), jax.random.key(0))
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)
    assert param_logical_axes(scanned) == param_logical_axes(config)
    ids = jax.random.randint(jax.random.key(1), (2, 7), 1, 1000)
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])

    def run(c, p, **kwargs):
        return Bert(c).apply({"params": p}, ids, mask, **kwargs)

    every = {"output_hidden_states": True, "output_attentions": True}
    a, b = run(config, params, **every), run(scanned, params, **every)
    for x, y in [(a.logits, b.logits), *zip(a.hidden_states, b.hidden_states, strict=True)]:
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(a.attentions, b.attentions, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    both = (config, scanned)
    sown = [run(c, params, mutable=["intermediates"])[1]["intermediates"] for c in both]
    projections = [layer_projections(c, s) for c, s in zip(both, sown, strict=True)]
    for x, y in zip(*projections, strict=True):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), x, y)
    grads = [jax.jit(jax.grad(lambda p, c=c: jnp.sum(run(c, p).logits ** 2)))(params) for c in both]
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), *grads)
    # Training: dropout, LayerDrop and remat inside the scan run and are deterministic in the key.
    train = scanned.replace(layerdrop=0.3, remat=True)
    key = {"dropout": jax.random.key(2)}
    first, again = (run(train, params, deterministic=False, rngs=key).logits for _ in range(2))
    np.testing.assert_array_equal(first, again)
