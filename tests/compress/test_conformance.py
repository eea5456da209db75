"""The conformance suite: every registered transform passes the same checks."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.compress import transforms
from jaxcompress.compress.distill import objective as objectives
from jaxcompress.config import finetune_defaults
from jaxcompress.models.bert import Bert
from jaxcompress.train.evaluate import make_eval_step
from jaxcompress.train.step import TrainState, make_optimizer, make_train_step, new_rng
from tests.conformance_cases import CASES, UNCASED, logits, model_and_batch
from tests.helpers import REPO, simulated_devices_env

IDS = [c.name for c in CASES]


def test_every_registered_transform_has_a_case():
    cased = {case.transform for case in CASES}
    assert cased <= set(transforms.REGISTRY), cased - set(transforms.REGISTRY)
    assert not cased & UNCASED, cased & UNCASED
    assert UNCASED <= set(transforms.REGISTRY), UNCASED - set(transforms.REGISTRY)
    missing = set(transforms.REGISTRY) - cased - UNCASED
    assert not missing, f"add a Case to tests/conformance_cases.py for {sorted(missing)}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_strength_is_identity(case):
    config, params, batch = model_and_batch()
    new_config, new_params = case.identity(config, params)
    np.testing.assert_allclose(
        logits(new_config, new_params, batch), logits(config, params, batch), atol=1e-5
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_strong_changes_the_model_and_jit_equals_no_jit(case):
    config, params, batch = model_and_batch()
    new_config, new_params = case.strong(config, params)
    eager = logits(new_config, new_params, batch)
    jitted = jax.jit(lambda p: logits(new_config, p, batch))(new_params)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    count = sum(x.size for x in jax.tree_util.tree_leaves(new_params))
    assert count < sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dtype_is_kept(case):
    config, params, _ = model_and_batch()
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    _, new_params = case.strong(config, bf16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(new_params)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trains_one_step_with_finite_gradients_and_evaluates(case):
    config, params, batch = model_and_batch()
    new_config, new_params = case.strong(config, params)
    model = Bert(new_config)
    loss_fn = objectives.finetune_loss(model)
    tx = make_optimizer(finetune_defaults().train, 10)
    state = TrainState(jnp.array(0), new_params, tx.init(new_params), new_rng(0))
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), new_params)
    step = make_train_step(loss_fn, tx)
    state, metrics = step(state, batch)  # warmup starts at learning rate 0
    # The global norm is finite only if every gradient is (jit: one compile, not one per op).
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), before, state.params)
    assert all(jax.tree_util.tree_leaves(changed))
    assert make_eval_step(model)(state.params, batch).shape == (4, 2)


@pytest.mark.devices8
def test_every_case_on_8_sharded_cpu_devices():
    env = simulated_devices_env(8)
    script = "from tests.conformance_sharded import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(IDS)
    for name, row in report.items():
        assert row["devices"] == 8, name
        assert row["sharded_params"] > 0, name
        assert row["max_abs_diff"] < 1e-5, (name, row)
