"""The conformance suite on four models the package never saw (linen MLP, CNN, Transformer, nnx).

Each case of `CASES` builds, at zero and at real strength, what a user trains: the params
(with any extra leaves), the reparam for `with_reparam`, the forward pass, and the export.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcompress import core
from jaxcompress.compress import share
from jaxcompress.compress.factorize import LowRank, densify, low_rank_params
from jaxcompress.compress.intercept import use_low_rank
from jaxcompress.compress.prune import sparse
from jaxcompress.compress.prune import unstructured as prune
from jaxcompress.compress.quant import pack
from jaxcompress.compress.quant.qat import add_lsq_steps, default_rules, qat
from jaxcompress.compress.quant.quantizers import QuantSpec
from tests.foreign_models import MODELS, Foreign, foreign

KERNELS = [(".*kernel", True), (".*", None)]
NOTHING = [(".*", None)]
# XLA:CPU compiles a tiny train step in a fraction of the time without its costly passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Setup(NamedTuple):
    params: Any  # what the optimizer trains (extra leaves included)
    reparam: core.Reparam
    forward: Callable  # (params the reparam's apply returns, x) -> y
    save: Callable  # (path, exported, trained) -> the loaded tree, the model's structure
    base: Any  # the float params zero strength must reproduce
    like: Any  # a tree in the structure the forward pass takes and the export keeps
    pruned: float = 0.0  # sparsity of the selected kernels in storage / the export
    context: Callable = contextlib.nullcontext  # entered around every forward pass


def quantization(m: Foreign, strong: bool) -> Setup:
    rules = default_rules(QuantSpec(bits=4)) if strong else NOTHING

    def save(path, exported, trained):
        return pack.load(pack.save(path, exported, rules), like=m.params)

    return Setup(m.params, qat(rules), m.apply, save, m.params, m.params)


def lsq(m: Foreign, strong: bool) -> Setup:
    rules = default_rules(QuantSpec(bits=4, scale_method="lsq")) if strong else NOTHING

    def save(path, exported, trained):  # the trained LSQ steps become the stored scales
        return pack.load(pack.save(path, trained, rules), like=m.params)

    return Setup(add_lsq_steps(m.params, rules), qat(rules), m.apply, save, m.params, m.params)


def magnitude(m: Foreign, strong: bool) -> Setup:
    final = 0.5 if strong else 0.0
    reparam = prune.magnitude_pruning(KERNELS, prune.Schedule(final))

    def save(path, exported, trained):
        return sparse.load(sparse.save(path, exported, KERNELS), like=m.params)

    return Setup(m.params, reparam, m.apply, save, m.params, m.params, final)


def movement(m: Foreign, strong: bool) -> Setup:
    schedule = prune.Schedule(0.5, initial=0.25, end_step=2) if strong else prune.Schedule(0.0)
    final = schedule.final
    reparam = prune.movement_pruning(KERNELS, schedule)

    def save(path, exported, trained):
        return sparse.load(sparse.save(path, exported, KERNELS), like=m.params)

    params = prune.add_movement_scores(m.params, KERNELS)
    return Setup(params, reparam, m.apply, save, m.params, m.params, final)


def low_rank(m: Foreign, strong: bool) -> Setup:
    spec = LowRank(rank=2) if strong else LowRank(fraction=1.0)
    factored, _ = low_rank_params(m.params, [(m.low_rank, spec), (".*", None)])

    def save(path, exported, trained):
        return pack.load(pack.save(path, exported, NOTHING), like=factored)

    forward = m.low_rank_apply(factored)
    return Setup(factored, core.identity(), forward, save, m.params, factored)


def tying(m: Foreign, strong: bool) -> Setup:
    base = m.params
    if not strong:  # members already equal: tying them loses nothing
        a, b = (member + "/" for member in m.tie)
        first = {p[len(a) :]: w for p, w in core.leaves_by_path(base).items() if p.startswith(a)}
        base = core.map_with_path(lambda p, w: first[p[len(b) :]] if p.startswith(b) else w, base)
    tied, shared = share.tie(base, [list(m.tie)])

    def save(path, exported, trained):
        return pack.load(pack.save(path, exported, NOTHING), like=m.params)

    return Setup(tied, share.tying(shared), m.apply, save, base, m.params)


def activations(m: Foreign, strong: bool) -> Setup:
    context = functools.partial(m.quantized_inputs, [(".*", 4 if strong else 16)], m.ranges)

    def save(path, exported, trained):
        return pack.load(pack.save(path, exported, NOTHING), like=m.params)

    return Setup(m.params, core.identity(), m.live, save, m.params, m.params, context=context)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Foreign, bool], Setup]
    atol: float = 1e-6  # zero strength against the float model


CASES = [
    Case("qat_4bit", quantization),
    Case("magnitude_50", magnitude),
    Case("movement", movement),
    Case("lsq_4bit", lsq),
    Case("low_rank", low_rank, atol=1e-5),
    Case("tie", tying),
    Case("quantized_inputs", activations, atol=1e-3),
]


def _close(a, b, atol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


def _kernels(tree) -> dict[str, np.ndarray]:
    return {p: np.asarray(w) for p, w in core.leaves_by_path(tree).items() if p.endswith("kernel")}


def _train(setup: Setup, x: jax.Array):
    """Two adam steps through `with_reparam`, one compiled step: the initial optimizer
    state, the first step's outputs and grads, the final params and optimizer state."""
    tx = core.with_reparam(setup.reparam, optax.adam(1e-2))

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            y = setup.forward(core.reparam_apply(p, opt_state), x)
            return jnp.mean(jnp.square(y - 1.0)), y

        (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return y, grads, optax.apply_updates(params, updates), opt_state

    params, opt_state = setup.params, tx.init(setup.params)
    start = opt_state
    step = step.lower(params, opt_state).compile(FAST_COMPILE)
    y, grads, params, opt_state = step(params, opt_state)
    _, _, params, opt_state = step(params, opt_state)
    return start, y, grads, params, opt_state


def _pruned_count(n: int, sparsity: float) -> int:
    return n - round((1.0 - sparsity) * n)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("name", MODELS)
def test_case_on_foreign_model(name, case, tmp_path):
    m = foreign(name)
    # Zero strength: the float model's output (jitted once per model where the forward
    # pass is the model's own; eager otherwise, to compile nothing per case).
    zero = case.setup(m, False)
    seen = zero.reparam.apply(zero.params, zero.reparam.init(zero.params))
    assert jax.tree_util.tree_structure(seen) == jax.tree_util.tree_structure(zero.like)
    run = m.reference if zero.forward is m.apply else zero.forward
    with zero.context():
        got = run(seen, m.x)
    _close(got, m.reference(zero.base, m.x), case.atol)

    setup = case.setup(m, True)
    run = m.reference if setup.forward is m.apply else setup.forward
    structure = jax.tree_util.tree_structure(setup.like)
    with setup.context():
        start, jitted, grads, params, opt_state = _train(setup, m.x)
        seen = core.reparam_apply(setup.params, start)
        eager = setup.forward(seen, m.x)
    assert jax.tree_util.tree_structure(seen) == structure
    assert float(jnp.max(jnp.abs(eager - m.reference(m.params, m.x)))) > 1e-4  # it compresses
    _close(jitted, eager, 1e-5)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(setup.params)
    if isinstance(m.params, nnx.State):
        assert isinstance(params, nnx.State)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in leaves)) > 0
    before, after = jax.tree.leaves(setup.params), jax.tree.leaves(params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))

    exported = core.finalize(params, opt_state)
    assert jax.tree_util.tree_structure(exported) == structure
    assert jax.tree_util.tree_structure(densify(exported)) == jax.tree_util.tree_structure(m.params)
    if setup.pruned:
        stored = _kernels(params) if case.name == "magnitude_50" else {}
        for path, w in _kernels(exported).items():
            assert int(np.sum(w == 0)) == _pruned_count(w.size, setup.pruned), path
            if path in stored:  # magnitude pruning keeps stored pruned weights exactly zero
                np.testing.assert_array_equal(stored[path][w == 0], 0)
    loaded = setup.save(tmp_path / "export.safetensors", exported, params)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(exported)
    seen = core.reparam_apply(params, opt_state)
    with setup.context():
        got, want = run(loaded, m.x), run(seen, m.x)
    _close(got, want, 1e-5)


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_low_rank_refuses_kernels_that_cannot_run_factors(name):
    m = foreign(name)
    shape = core.leaves_by_path(m.params)[f"{m.refused}/kernel"].shape
    with pytest.raises(ValueError, match=rf"{m.refused}/kernel is 'kernel' of shape \({shape[0]}"):
        low_rank_params(m.params, [(f"{m.refused}/kernel", LowRank(rank=2)), (".*", None)])


@pytest.mark.parametrize("name", MODELS)
def test_tie_refuses_a_group_of_one(name):
    m = foreign(name)
    with pytest.raises(ValueError, match="a group needs two or more members"):
        share.tie(m.params, [m.tie[0]])


def test_use_low_rank_refuses_factors_on_a_layer_that_cannot_run_them():
    m = foreign("nnx_mlp")
    factors = {"kernel_a": jnp.ones((16, 2)), "kernel_b": jnp.ones((2, 16))}
    with pytest.raises(ValueError, match="layers holds kernel_a/kernel_b but is List; only"):
        use_low_rank(nnx.clone(m.module), {"layers": factors})
