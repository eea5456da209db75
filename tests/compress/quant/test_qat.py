"""QAT as a rule-driven Reparam: which leaves it quantizes, its errors, LSQ steps, BERT presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core
from jaxcompress.compress.quant.qat import (
    INT8,
    INT8_TENSOR,
    LSQ_SUFFIX,
    add_lsq_steps,
    qat,
    split_lsq_steps,
)
from jaxcompress.compress.quant.quantizers import QuantSpec, fake_quant
from jaxcompress.models import bert_rules
from jaxcompress.models.bert import abstract_params
from tests.helpers import tiny_config


def weights(shape=(16, 8), seed=0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape) * 0.05


def small_params() -> dict:
    keys = jax.random.split(jax.random.key(7), 3)
    return {
        "layer": {
            "dense": {"kernel": weights((16, 8)), "bias": jax.random.normal(keys[0], (8,))},
            "LayerNorm": {
                "scale": 1 + 0.1 * jax.random.normal(keys[1], (8,)),
                "bias": jax.random.normal(keys[2], (8,)),
            },
        },
        "head": {"kernel": weights((8, 2), seed=1), "bias": jnp.zeros(2)},
    }


def test_qat_quantizes_kernels_only_and_passes_gradients():
    params = small_params()
    spec = QuantSpec(4, scale_method="percentile", percentile=90.0)
    reparam = qat([(".*/kernel", spec), (".*", None)])
    state = reparam.init(params)
    out = reparam.apply(params, state)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    flat_out = dict(zip(core.leaf_paths(out), jax.tree.leaves(out), strict=True))
    flat_in = dict(zip(core.leaf_paths(params), jax.tree.leaves(params), strict=True))
    for path in flat_in:
        if path.endswith("kernel"):
            np.testing.assert_array_equal(flat_out[path], fake_quant(flat_in[path], spec))
            assert not np.array_equal(flat_out[path], flat_in[path])
        else:
            assert flat_out[path] is flat_in[path]
    np.testing.assert_array_equal(
        jax.jit(reparam.apply)(params, state)["head"]["kernel"], out["head"]["kernel"]
    )
    grads = jax.grad(lambda p: jnp.sum(reparam.apply(p, state)["layer"]["dense"]["kernel"]))(params)
    g = np.asarray(grads["layer"]["dense"]["kernel"])
    assert set(np.unique(g)) == {0.0, 1.0}
    assert reparam.update(params, state, jnp.int32(3)) == state


def test_qat_rule_errors():
    params = small_params()
    with pytest.raises(ValueError, match=r"\['encoder/.*'\] selected no parameter"):
        qat([(".*/kernel", QuantSpec()), ("encoder/.*", QuantSpec())]).apply(params, ())
    with pytest.raises(ValueError, match="expected a QuantSpec or None"):
        qat([(".*/kernel", 8)])
    with pytest.raises(ValueError, match="head/kernel: group_size 3 does not divide the 8 rows"):
        qat(
            [
                ("layer/.*/kernel", QuantSpec(granularity="group", group_size=16)),
                ("head/kernel", QuantSpec(granularity="group", group_size=3)),
                (".*", None),
            ]
        ).apply(params, ())
    with pytest.raises(ValueError, match="call add_lsq_steps"):
        qat([(".*/kernel", QuantSpec(scale_method="lsq")), (".*", None)]).apply(params, ())


def test_qat_lsq_steps_are_trainable_params():
    rules = [("layer/dense/kernel", QuantSpec(4, scale_method="lsq")), (".*", None)]
    params = add_lsq_steps(small_params(), rules)
    step = params["layer"]["dense"]["kernel" + LSQ_SUFFIX]
    assert step.shape == (8,) and np.all(step > 0)
    model, steps = split_lsq_steps(params)
    assert jax.tree.structure(model) == jax.tree.structure(small_params())
    assert list(steps) == ["layer/dense/kernel"]
    reparam = qat(rules)
    out = reparam.apply(params, reparam.init(params))
    assert jax.tree.structure(out) == jax.tree.structure(small_params())

    def loss(p):
        y = jnp.ones((3, 16)) @ reparam.apply(p, ())["layer"]["dense"]["kernel"]
        return jnp.sum(jnp.sin(y))

    g = jax.grad(loss)(params)["layer"]["dense"]["kernel" + LSQ_SUFFIX]
    assert np.all(np.isfinite(g)) and np.any(g != 0)
    assert add_lsq_steps(params, rules)["layer"]["dense"]["kernel" + LSQ_SUFFIX] is step


def test_bert_preset_rules():
    config = tiny_config(num_hidden_layers=1, vocab_size=64, num_labels=2)
    shapes = abstract_params(config)  # BERT's names and shapes, without compiling its init
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    out = qat(bert_rules.weight_rules(INT8, INT8_TENSOR)).apply(params, ())
    flat_in = dict(zip(core.leaf_paths(params), jax.tree.leaves(params), strict=True))
    flat_out = dict(zip(core.leaf_paths(out), jax.tree.leaves(out), strict=True))
    for path, w in flat_in.items():
        quantized = path.endswith("kernel") or path.endswith("_embeddings")
        assert (flat_out[path] is not w) == quantized, path
    word = np.asarray(flat_out["bert/embeddings/word_embeddings"])
    assert len(np.unique(word)) <= 255
    out_float_embeddings = qat(bert_rules.weight_rules(INT8, None)).apply(params, ())
    assert (
        out_float_embeddings["bert"]["embeddings"]["word_embeddings"]
        is flat_in["bert/embeddings/word_embeddings"]
    )
