"""The optax wrapper: reparam state inside the optimizer state, stored zeros, finalize, any tree."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcompress import core
from jaxcompress.compress.prune import sparse
from jaxcompress.compress.prune import unstructured as prune
from jaxcompress.compress.quant.qat import add_lsq_steps, qat
from jaxcompress.compress.quant.quantizers import QuantSpec, fake_quant

KERNELS = [(".*/kernel", True), (".*", None)]
INT4 = QuantSpec(bits=4)


class MLP(nn.Module):
    """A user's model: plain linen Dense layers, its own names."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(4)(x)


X = jax.random.normal(jax.random.key(1), (8, 8))
Y = jax.random.normal(jax.random.key(2), (8, 4))


@functools.cache
def mlp_params():
    return jax.jit(MLP().init)(jax.random.key(0), X)["params"]


def mse(params):
    return jnp.mean(jnp.square(MLP().apply({"params": params}, X) - Y))


def sin_loss(params):
    return sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(params))


def step_fn(tx, loss):
    """One optimizer step as a user writes it: gradients through `reparam_apply`."""

    def step(params, opt_state):
        grads = jax.grad(lambda p: loss(core.reparam_apply(p, opt_state)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def run(tx, params, steps, loss=mse, jit=True):
    """Yields (step, params, opt_state) after each of `steps` optimizer steps."""
    step = step_fn(tx, loss)
    step = jax.jit(step) if jit else step
    opt_state = jax.jit(tx.init)(params) if jit else tx.init(params)
    for t in range(1, steps + 1):
        params, opt_state = step(params, opt_state)
        yield t, params, opt_state


def pruned_count(n: int, sparsity: float) -> int:
    return n - round((1.0 - sparsity) * n)


def test_magnitude_pruning_on_schedule_keeps_stored_zeros_and_zero_moments():
    schedule = prune.Schedule(final=0.75, begin_step=1, end_step=5, frequency=2)
    tx = core.with_reparam(prune.magnitude_pruning(KERNELS, schedule), optax.adam(1e-2))
    for t, params, opt_state in run(tx, mlp_params(), 6):
        found = core.reparam_state(opt_state)
        assert int(found.step) == t
        masks = core.leaves_by_path(found.state.masks)
        adam = found.inner[0]
        mu, nu = core.leaves_by_path(adam.mu), core.leaves_by_path(adam.nu)
        for path, w in core.leaves_by_path(params).items():
            if not path.endswith("kernel"):
                assert masks[path].shape == ()
                continue
            w, m = np.asarray(w), np.asarray(masks[path])
            expected = pruned_count(w.size, float(schedule.value(t)))
            assert int(np.sum(~m)) == expected, (t, path)
            assert np.all(w[~m] == 0), (t, path)  # exactly zero in the stored params
            assert int(np.sum(w == 0)) == expected
            assert np.all(np.asarray(mu[path])[~m] == 0)
            assert np.all(np.asarray(nu[path])[~m] == 0)
    assert prune.sparsity(params, KERNELS) == pytest.approx(0.75, abs=1e-2)
    exported = core.finalize(params, opt_state)
    assert jax.tree.structure(exported) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(exported), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_per_rule_sparsity_and_false_rules():
    rules = [
        ("Dense_0/kernel", 0.5),
        ("Dense_1/kernel", 0.95),
        ("Dense_2/kernel", False),
        (".*", None),
    ]
    schedule = prune.Schedule(final=0.8, end_step=4, frequency=2)
    tx = core.with_reparam(prune.magnitude_pruning(rules, schedule), optax.sgd(1e-2))
    for t, params, _ in run(tx, mlp_params(), 4):
        for name, final in (("Dense_0", 0.5), ("Dense_1", 0.95)):
            w = np.asarray(params[name]["kernel"])
            target = float(schedule.scaled_to(final).value(t))
            assert int(np.sum(w == 0)) == pruned_count(w.size, target), (t, name)
        assert np.all(np.asarray(params["Dense_2"]["kernel"]) != 0)
    assert float(schedule.scaled_to(0.5).value(2)) == pytest.approx(0.4375, abs=1e-6)
    for bad in (1.5, "yes", -0.1, 1):
        with pytest.raises(ValueError, match="prune rule 'x': value must be True"):
            prune.magnitude_pruning([("x", bad)], schedule)


def test_schedule_fields_are_validated():
    with pytest.raises(ValueError, match=r"Schedule.final must be .* in \[0, 1\), got 1.5"):
        prune.Schedule(final=1.5)
    with pytest.raises(ValueError, match=r"Schedule.initial must be"):
        prune.Schedule(final=0.5, initial=-0.1)
    with pytest.raises(ValueError, match="Schedule.power must be a number > 0"):
        prune.Schedule(final=0.5, power=0.0)
    with pytest.raises(ValueError, match="Schedule.end_step must be an int"):
        prune.Schedule(final=0.5, end_step=2.5)


def test_qat_finalize_is_fake_quant_of_latent_float_weights():
    rules = [(".*/kernel", INT4), (".*", None)]
    start = mlp_params()
    tx = core.with_reparam(qat(rules), optax.adam(1e-2))
    *_, (_, params, opt_state) = run(tx, start, 2)
    exported = core.finalize(params, opt_state)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        latent = params[name]["kernel"]
        assert latent.dtype == jnp.float32
        assert not np.array_equal(latent, start[name]["kernel"])  # it trained
        np.testing.assert_allclose(exported[name]["kernel"], fake_quant(latent, INT4), atol=1e-6)
        assert not np.allclose(latent, exported[name]["kernel"], atol=1e-3)  # not projected
        assert len(np.unique(np.asarray(exported[name]["kernel"][:, 0]))) <= 2**4
        np.testing.assert_array_equal(exported[name]["bias"], params[name]["bias"])


def test_lsq_steps_train_inside_params_and_leave_the_export():
    lsq = QuantSpec(bits=4, scale_method="lsq")
    rules = [("dense/kernel", lsq), (".*", None)]
    tree = {"dense": {"kernel": jax.random.normal(jax.random.key(5), (4, 4)), "bias": jnp.ones(4)}}
    params = add_lsq_steps(tree, rules)
    tx = core.with_reparam(qat(rules), optax.sgd(0.1))
    *_, (_, trained, opt_state) = run(tx, params, 2, loss=sin_loss)
    step = trained["dense"]["kernel@lsq_step"]
    assert not np.array_equal(step, params["dense"]["kernel@lsq_step"])  # the step trained
    exported = core.finalize(trained, opt_state)
    assert jax.tree.structure(exported) == jax.tree.structure(tree)
    np.testing.assert_allclose(
        exported["dense"]["kernel"], fake_quant(trained["dense"]["kernel"], lsq, step), atol=1e-6
    )


def prune_then_qat(end_step: int) -> core.Reparam:
    return core.chain(
        prune.magnitude_pruning(KERNELS, prune.Schedule(final=0.5, end_step=end_step)),
        qat([(".*/kernel", INT4), (".*", None)]),
    )


def test_chain_of_pruning_and_qat_keeps_both():
    tx = core.with_reparam(prune_then_qat(end_step=2), optax.adam(1e-2))
    *_, (_, params, opt_state) = run(tx, mlp_params(), 3)
    exported = core.finalize(params, opt_state)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        w = params[name]["kernel"]
        assert int(np.sum(np.asarray(w) == 0)) == w.size // 2  # pruned, in storage
        np.testing.assert_allclose(exported[name]["kernel"], fake_quant(w, INT4), atol=1e-6)
        assert np.all(np.asarray(exported[name]["kernel"])[np.asarray(w) == 0] == 0)


def test_the_wrapper_under_jit_equals_eager():
    tree = {"dense": {"kernel": jax.random.normal(jax.random.key(4), (4, 4)), "bias": jnp.ones(4)}}
    reparam = prune.magnitude_pruning(KERNELS, prune.Schedule(final=0.5, end_step=1))
    tx = core.with_reparam(reparam, optax.sgd(0.1, momentum=0.9))
    *_, (_, jitted, jitted_state) = run(tx, tree, 2, loss=sin_loss)
    *_, (_, eager, eager_state) = run(tx, tree, 2, loss=sin_loss, jit=False)
    for got, want in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    for got, want in zip(jax.tree.leaves(eager_state), jax.tree.leaves(jitted_state), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert int(np.sum(np.asarray(jitted["dense"]["kernel"]) == 0)) == 8


def test_reparam_state_is_found_inside_chains_and_injected_hyperparams():
    reparam = prune.magnitude_pruning(KERNELS, prune.Schedule(final=0.5))
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), core.with_reparam(reparam, inner))
    params = mlp_params()
    opt_state = jax.jit(tx.init)(params)
    seen = core.reparam_apply(params, opt_state)
    assert int(np.sum(np.asarray(seen["Dense_1"]["kernel"]) == 0)) == 16 * 16 // 2
    with pytest.raises(ValueError, match="found 0"):
        core.reparam_apply(params, optax.adam(1e-2).init(params))
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, opt_state)
    # A three-function Reparam (no finalize, no stored_mask) still wraps.
    plain = core.Reparam(lambda p: (), lambda p, s: p, lambda p, s, t: s)
    tx = core.with_reparam(plain, optax.sgd(0.1))
    *_, (_, trained, opt_state) = run(tx, params, 1)
    assert core.leaf_paths(core.finalize(trained, opt_state)) == core.leaf_paths(params)


def test_movement_pruning_through_the_wrapper_exports_without_scores():
    params = prune.add_movement_scores(mlp_params(), KERNELS)
    reparam = prune.movement_pruning(KERNELS, prune.Schedule(final=0.5, end_step=2))
    tx = core.with_reparam(reparam, optax.adam(1e-2))
    *_, (_, trained, opt_state) = run(tx, params, 2)
    exported = core.finalize(trained, opt_state)
    assert jax.tree.structure(exported) == jax.tree.structure(mlp_params())
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        w = np.asarray(exported[name]["kernel"])
        assert int(np.sum(w == 0)) == w.size // 2


def list_tree():
    k = jax.random.split(jax.random.key(3), 3)
    return {
        "layers": [
            {"kernel": jax.random.normal(k[0], (8, 8)), "bias": jnp.zeros(8)},
            {"kernel": jax.random.normal(k[1], (8, 8)), "bias": jnp.zeros(8)},
        ],
        "heads": {0: {"kernel": jax.random.normal(k[2], (8, 2))}, 1: {"scale": jnp.ones(2)}},
        "pair": (jnp.ones(3), jnp.ones(3)),
    }


def test_pruning_on_lists_int_keys_and_tuples(tmp_path):
    tree = list_tree()
    assert core.leaf_paths(tree)[:3] == ["heads/0/kernel", "heads/1/scale", "layers/0/bias"]
    rules = [("layers/1/kernel", 0.75), (".*/kernel", True), (".*", None)]
    tx = core.with_reparam(prune.magnitude_pruning(rules, prune.Schedule(0.5)), optax.sgd(0.1))
    *_, (_, params, opt_state) = run(tx, tree, 2, loss=sin_loss)
    assert jax.tree.structure(params) == jax.tree.structure(tree)
    assert int(np.sum(np.asarray(params["layers"][0]["kernel"]) == 0)) == 32
    assert int(np.sum(np.asarray(params["layers"][1]["kernel"]) == 0)) == 48
    assert int(np.sum(np.asarray(params["heads"][0]["kernel"]) == 0)) == 8
    stats = prune.pruning_stats(params, rules)
    assert stats["remaining_params"] == 2 * (64 + 8) + 16 + 2 + 6 - (32 + 48 + 8)
    rewound = prune.rewind(params, tree, rules)
    assert jax.tree.structure(rewound) == jax.tree.structure(tree)
    scored = prune.add_movement_scores(tree, rules)
    assert "kernel@movement_score" in scored["layers"][1]
    model, scores = prune.split_scores(scored)
    assert jax.tree.structure(model) == jax.tree.structure(tree)
    assert sorted(scores) == ["heads/0/kernel", "layers/0/kernel", "layers/1/kernel"]
    with pytest.raises(ValueError, match="pair/0: cannot add '@movement_score' beside it"):
        prune.add_movement_scores(tree, [("pair/0", True), (".*", None)])
    path = sparse.save(tmp_path / "s.safetensors", params, rules)
    loaded = sparse.load(path, like=tree)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.up(x)))


def test_pruning_on_an_nnx_state():
    model = NnxMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    assert core.leaf_paths(state) == ["out/bias", "out/kernel", "up/bias", "up/kernel"]

    def loss(params):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params)(X) - Y))

    tx = core.with_reparam(prune.magnitude_pruning(KERNELS, prune.Schedule(0.5)), optax.adam(0.01))
    *_, (_, params, opt_state) = run(tx, state, 2, loss=loss)
    assert isinstance(params, nnx.State)
    assert jax.tree.structure(params) == jax.tree.structure(state)
    assert int(np.sum(np.asarray(params["up"]["kernel"][...]) == 0)) == 64
    nnx.update(model, core.finalize(params, opt_state))
    assert int(np.sum(np.asarray(model.out.kernel[...]) == 0)) == 32
    scored = prune.add_movement_scores(state, KERNELS)
    assert isinstance(scored, nnx.State)
    assert isinstance(scored["up"]["kernel@movement_score"], nnx.Param)
    assert jax.tree.structure(prune.split_scores(scored)[0]) == jax.tree.structure(state)
