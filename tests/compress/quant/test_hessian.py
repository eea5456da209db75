"""Q-BERT mixed precision: Hutchinson traces, exact bit assignment, group-wise rules."""

import itertools
import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.compress.distill.objective import task_loss
from jaxcompress.compress.quant import hessian
from jaxcompress.compress.quant.qat import quantize_tree
from jaxcompress.models.bert import Bert, init_params
from tests.helpers import tiny_config


def quadratic(a: np.ndarray):
    """0.5 x^T A x over the concatenation of params['a'] (3,) and params['b'] (2, 2)."""
    a = jnp.asarray(a, jnp.float32)

    def loss(params):
        x = jnp.concatenate([params["a"].reshape(-1), params["b"].reshape(-1)])
        return 0.5 * x @ a @ x

    params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    return loss, params


def by_leaf(path: str) -> str:
    return path


def test_diagonal_hessian_is_exact_with_one_sample():
    diag = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    loss, params = quadratic(np.diag(diag))
    est = hessian.hutchinson_trace(loss, params, by_leaf, jax.random.key(1), 1)
    assert float(est.trace["a"]) == pytest.approx(6.0, abs=1e-6)
    assert float(est.trace["b"]) == pytest.approx(22.0, abs=1e-6)
    assert float(est.per_param["b"]) == pytest.approx(22.0 / 4, abs=1e-6)
    assert math.isnan(float(est.stderr["a"]))


def test_dense_hessian_converges_to_exact_block_traces():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(7, 7))
    a = m @ m.T + 7 * np.eye(7)
    loss, params = quadratic(a)
    rules = [("a", "first"), ("b", "second")]
    est = hessian.hutchinson_trace(loss, params, rules, jax.random.key(2), 20000)
    exact = {"first": np.trace(a[:3, :3]), "second": np.trace(a[3:, 3:])}
    for name, value in exact.items():
        # Var of one probe: 2 A_ij^2 per ordered pair i != j inside the group, A_ij^2 per
        # pair i inside and j outside (its one cross term v_i v_j).
        inside = np.arange(7) < 3 if name == "first" else np.arange(7) >= 3
        off = a - np.diag(np.diag(a))
        var = 2 * np.sum(off[inside][:, inside] ** 2) + np.sum(off[inside][:, ~inside] ** 2)
        expected_stderr = math.sqrt(var / 20000)
        assert float(est.stderr[name]) == pytest.approx(expected_stderr, rel=0.05)
        assert abs(float(est.trace[name]) - value) < 4 * expected_stderr
        assert abs(float(est.trace[name]) - value) < 0.01 * value


def test_ungrouped_leaves_get_no_probe_and_groups_must_be_nonempty():
    loss, params = quadratic(np.ones((7, 7)) + np.eye(7))
    one = hessian.hutchinson_trace(loss, params, {"a": "x"}.get, jax.random.key(0), 1)
    assert set(one.trace) == {"x"}
    # Probes on 'a' only: v_a^T (1 + I) v_a = 3 + (sum v_a)^2, i.e. 4 or 12, never a cross
    # term with 'b'; the mean of the two (weights 3/4, 1/4) is the trace 6.
    value = float(one.trace["x"])
    assert min(abs(value - 4.0), abs(value - 12.0)) < 1e-5
    many = hessian.hutchinson_trace(loss, params, {"a": "x"}.get, jax.random.key(0), 4000)
    assert abs(float(many.trace["x"]) - 6.0) < 4 * float(many.stderr["x"])
    with pytest.raises(ValueError, match="selected no parameter"):
        hessian.hutchinson_trace(loss, params, lambda p: None, jax.random.key(0), 1)
    with pytest.raises(ValueError, match="selected no parameter"):
        hessian.hutchinson_trace(loss, params, [("a", "x"), ("c", "y")], jax.random.key(0), 1)
    with pytest.raises(ValueError, match="samples"):
        hessian.hutchinson_trace(loss, params, by_leaf, jax.random.key(0), 0)


def tiny_bert():
    config = tiny_config(vocab_size=64, max_position_embeddings=16, num_labels=2)
    params = init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (4, 8), 0, 64)
    mask = jnp.ones_like(ids)
    labels = jnp.array([0, 1, 0, 1])

    def loss(p):
        logits = Bert(config).apply({"params": p}, ids, mask).logits
        return task_loss(logits, labels, jnp.ones(4))

    return params, loss


@pytest.mark.slow
def test_tiny_bert_layer_traces_are_finite_under_jit():
    params, loss = tiny_bert()
    groups = hessian.encoder_layer_group
    run = jax.jit(lambda p, k: hessian.hutchinson_trace(loss, p, groups, k, 2))
    est = run(params, jax.random.key(3))
    names = ["bert/encoder/layer/0", "bert/encoder/layer/1"]
    assert list(est.trace) == names
    sizes = hessian.group_sizes(params, groups)
    assert sizes == {name: 4 * 32 * 32 + 2 * 32 * 64 for name in names}
    for name in names:
        assert np.isfinite(float(est.trace[name])) and np.isfinite(float(est.stderr[name]))
        expected = float(est.trace[name]) / sizes[name]
        assert float(est.per_param[name]) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    # The whole pipeline: traces -> bits -> rules that qat and quant_pack accept
    # (`quantize_tree` is what both run on the rules).
    sensitivity = {n: max(float(v), 0.0) for n, v in est.per_param.items()}
    bits = hessian.assign_bits(sensitivity, sizes, budget_bits=3.0)
    rules = hessian.mixed_precision_rules(bits, group_size=16)
    _, codes = quantize_tree(params, rules)
    assert len(codes) == 12
    for path, (qt, spec) in codes.items():
        assert spec.bits == bits[hessian.encoder_layer_group(path)]
        assert int(jnp.max(jnp.abs(qt.codes))) <= 2 ** (spec.bits - 1) - 1


def brute_force(sensitivity, sizes, choices, budget):
    names = list(sensitivity)
    best = None
    for combo in itertools.product(choices, repeat=len(names)):
        bits = dict(zip(names, combo, strict=True))
        if hessian.average_bits(sizes, bits) <= Fraction(budget):
            err = hessian.proxy_error(sensitivity, sizes, bits)
            best = err if best is None else min(best, err)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_assign_bits_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    sens = {f"g{i}": float(x) for i, x in enumerate(rng.exponential(size=5))}
    sizes = {g: int(n) for g, n in zip(sens, rng.integers(1, 50, size=5), strict=True)}
    for budget in (2.0, 2.7, 3.0, 4.5, 8.0):
        bits = hessian.assign_bits(sens, sizes, budget_bits=budget)
        assert hessian.average_bits(sizes, bits) <= Fraction(budget)
        optimum = brute_force(sens, sizes, hessian.CHOICES, budget)
        assert hessian.proxy_error(sens, sizes, bits) == pytest.approx(optimum, rel=1e-12)


def test_assign_bits_meets_the_budget_and_is_monotone_in_sensitivity():
    sens = {f"layer{i}": s for i, s in enumerate([0.3, 5.0, 1.2, 0.01, 2.2, 0.7])}
    sizes = dict.fromkeys(sens, 1000)
    previous = None
    for budget in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.5, 8.0):
        bits = hessian.assign_bits(sens, sizes, budget_bits=budget)
        assert hessian.average_bits(sizes, bits) <= Fraction(budget)
        order = sorted(sens, key=sens.get)
        assert [bits[g] for g in order] == sorted(bits[g] for g in order)
        if previous is not None:  # more budget never lowers the error
            assert hessian.proxy_error(sens, sizes, bits) <= previous
        previous = hessian.proxy_error(sens, sizes, bits)
    assert set(hessian.assign_bits(sens, sizes, budget_bits=8.0).values()) == {8}
    assert set(hessian.assign_bits(sens, sizes, budget_bits=2.0).values()) == {2}
    # The budget is a hard constraint: 2.5 bits on 6 equal groups is at most 15 bits in all.
    assert sum(hessian.assign_bits(sens, sizes, budget_bits=2.5).values()) <= 15


def test_bad_input_raises():
    sens, sizes = {"a": 1.0, "b": 2.0}, {"a": 10, "b": 10}
    with pytest.raises(ValueError, match="below the smallest choice"):
        hessian.assign_bits(sens, sizes, budget_bits=1.5)
    with pytest.raises(ValueError, match="2..8"):
        hessian.assign_bits(sens, sizes, choices=(1, 4), budget_bits=4)
    with pytest.raises(ValueError, match="at least one group"):
        hessian.assign_bits({}, {}, budget_bits=4)
    with pytest.raises(ValueError, match="different groups"):
        hessian.assign_bits(sens, {"a": 10}, budget_bits=4)
    with pytest.raises(ValueError, match="finite"):
        hessian.assign_bits({"a": -1.0, "b": 1.0}, sizes, budget_bits=4)
    with pytest.raises(ValueError, match="positive integer"):
        hessian.assign_bits(sens, {"a": 0, "b": 10}, budget_bits=4)
    with pytest.raises(ValueError, match="group 'a'"):
        hessian.mixed_precision_rules({"a": 9}, group_size=8)
    with pytest.raises(ValueError, match="no pattern"):
        hessian.mixed_precision_rules({"a": 4}, group_size=8, patterns={"b": ".*"})
    with pytest.raises(ValueError, match="at least one group"):
        hessian.mixed_precision_rules({}, group_size=8)


def test_mixed_precision_rules_shape():
    rules = hessian.mixed_precision_rules({"bert/encoder/layer/0": 3}, group_size=128)
    (pattern, spec), tail = rules[0], rules[1:]
    assert tail == [(".*", None)]
    assert spec.bits == 3 and spec.granularity == "group" and spec.group_size == 128
    assert re.fullmatch(pattern, "bert/encoder/layer/0/attention/self/query/kernel")
    assert re.fullmatch(pattern, "bert/encoder/layer/0/output/dense/kernel_a")
    assert not re.fullmatch(pattern, "bert/encoder/layer/0/output/dense/bias")
    assert not re.fullmatch(pattern, "bert/encoder/layer/00/output/dense/kernel")
