"""The transform contract on any parameter tree: rules, map_rules, compose, Reparam chains."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

from jaxcompress import core
from jaxcompress.compress import factorize


class MLP(nn.Module):
    """Somebody else's model: not BERT, its own naming."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="up")(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3, name="head")(x)


@pytest.fixture
def mlp_params():
    return MLP().init(jax.random.key(0), jnp.ones((1, 8)))["params"]


def test_paths_and_first_match_wins(mlp_params):
    assert core.leaf_paths(mlp_params) == [
        "Dense_0/bias", "Dense_0/kernel", "head/bias", "head/kernel", "up/bias", "up/kernel",
    ]  # fmt: skip
    rules = [("head/.*", None), (".*/kernel", "k"), ("up/bias", "b")]
    assert core.match_rules(mlp_params, rules) == {
        "Dense_0/kernel": "k",
        "up/kernel": "k",
        "up/bias": "b",
    }


def test_rules_that_select_nothing_are_errors(mlp_params):
    with pytest.raises(ValueError, match=r"\['encoder/.*'\] selected no parameter"):
        core.match_rules(mlp_params, [(".*/kernel", 1), ("encoder/.*", 2)])
    with pytest.raises(ValueError, match=r"\['up/kernel'\] selected no parameter"):
        core.match_rules(mlp_params, [(".*", None), ("up/kernel", 2)])  # shadowed
    with pytest.raises(ValueError, match="bad regex"):
        core.match_rules(mlp_params, [("(", 1)])


def test_unmatched_rules_name_the_nearest_paths(mlp_params):
    with pytest.raises(ValueError, match=r"'up/kernal' matches no path \(nearest: up/kernel, "):
        core.match_rules(mlp_params, [("up/kernal", 1)])
    with pytest.raises(ValueError, match="'up/kernel' only matches paths that earlier rules"):
        core.match_rules(mlp_params, [(".*", None), ("up/kernel", 2)])


def test_rules_on_frozen_dicts_int_keys_tuples_and_nnx_state():
    tree = FrozenDict(
        {
            "blocks": {0: {"w": jnp.ones(2)}, 1: {"w": jnp.ones(2)}},
            "seq": [jnp.ones(1), (jnp.ones(1),)],
        }
    )
    assert core.leaf_paths(tree) == ["blocks/0/w", "blocks/1/w", "seq/0", "seq/1/0"]
    out = core.map_rules(lambda path, x, spec: x * spec, tree, [("blocks/1/w|seq/1/0", 3.0)])
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    np.testing.assert_array_equal(out["blocks"][1]["w"], [3.0, 3.0])
    np.testing.assert_array_equal(out["seq"][1][0], [3.0])
    np.testing.assert_array_equal(out["blocks"][0]["w"], [1.0, 1.0])
    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
    assert core.leaf_paths(state) == ["bias", "kernel"]  # no trailing '/value'
    assert core.leaf_paths({"up": {"kernel": nn.Partitioned(jnp.ones(2), names=("a",))}}) == [
        "up/kernel"
    ]
    doubled = core.map_rules(lambda path, x, spec: 2 * x, state, [("kernel", True), (".*", None)])
    assert isinstance(doubled, nnx.State)
    np.testing.assert_allclose(doubled["kernel"][...], 2 * state["kernel"][...], atol=1e-6)


def test_strip_extra_leaves_keeps_the_structure():
    tree = FrozenDict({"a": {"kernel": jnp.ones(2), "kernel@x": jnp.ones(2)}, "b": [jnp.ones(3)]})
    stripped = core.strip_extra_leaves(tree)
    assert isinstance(stripped, FrozenDict)
    assert core.leaf_paths(stripped) == ["a/kernel", "b/0"]


def test_fullmatch_not_search(mlp_params):
    with pytest.raises(ValueError, match="selected no parameter"):
        core.match_rules(mlp_params, [("kernel", 1)])


def test_map_rules_and_lists_in_trees():
    tree = {"layers": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}], "b": jnp.zeros(2)}
    out = core.map_rules(lambda path, x, spec: x * spec, tree, [("layers/1/w", 3.0)])
    np.testing.assert_array_equal(out["layers"][1]["w"], [3.0, 3.0])
    np.testing.assert_array_equal(out["layers"][0]["w"], [1.0, 1.0])


def test_low_rank_on_a_foreign_model(mlp_params):
    x = jax.random.normal(jax.random.key(1), (4, 8))
    reference = MLP().apply({"params": mlp_params}, x)
    full = factorize.LowRank(fraction=1.0)
    factored, ranks = factorize.low_rank_params(mlp_params, [(r"(up|Dense_0)/kernel", full)])
    assert ranks == {"up": 8, "Dense_0": 16}
    assert factored["up"]["kernel_a"].shape == (8, 8) and factored["up"]["kernel_b"].shape == (
        8,
        16,
    )
    out = MLP().apply({"params": factorize.densify(factored)}, x)
    np.testing.assert_allclose(out, reference, atol=1e-5)
    half, _ = factorize.low_rank_params(mlp_params, [("Dense_0/kernel", factorize.LowRank(rank=4))])
    assert not np.allclose(
        MLP().apply({"params": factorize.densify(half)}, x), reference, atol=1e-3
    )


def scale_reparam(factor: float) -> core.Reparam:
    """Scales every leaf by a counter-driven factor: a tiny reparameterization for the tests."""
    return core.Reparam(
        init=lambda params: jnp.array(factor),
        apply=lambda params, s: jax.tree_util.tree_map(lambda x: x * s, params),
        update=lambda params, s, step: s + step,
    )


def test_chain_applies_and_updates_in_order():
    params = {"w": jnp.ones(2)}
    chained = core.chain(scale_reparam(2.0), core.identity(), scale_reparam(3.0))
    state = chained.init(params)
    np.testing.assert_array_equal(chained.apply(params, state)["w"], [6.0, 6.0])
    state = jax.jit(chained.update)(params, state, jnp.array(1.0))
    np.testing.assert_array_equal(jax.jit(chained.apply)(params, state)["w"], [12.0, 12.0])


def test_compose_runs_left_to_right():
    def add(k):
        return lambda config, params: (config + [k], params)

    config, params = core.compose(add("a"), add("b"))([], {})
    assert config == ["a", "b"]
