"""Every training-time method of the registry, through the train loop's own plug-in path.

A method is parsed from its config section, adds its extras, plans on a tiny BERT, trains
through `core.with_reparam` in the loop's jitted step, and exports. A method added to
`compress.registry.TRAINING_METHODS` without a case here fails the suite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core
from jaxcompress.compress.distill import objective as objectives
from jaxcompress.compress.method import Setup
from jaxcompress.compress.registry import NOT_WEIGHTS, TRAINING_METHODS
from jaxcompress.config import finetune_defaults
from jaxcompress.models.bert import Bert, Linear
from jaxcompress.train.step import TrainState, make_optimizer, make_train_step, new_rng
from tests.conformance_cases import logits, model_and_batch

# section -> {case: config changes of that section}; each case is a real strength.
CASES = {
    "share": {"all_at_once": {"groups": "all"}},
    "prune": {
        "magnitude": {"method": "magnitude", "sparsity": 0.5, "frequency": 1},
        "movement_penalised": {
            "method": "movement",
            "sparsity": 0.5,
            "frequency": 1,
            "score_l1": 1.0,
        },
    },
    "quantize": {
        "w4_a8_calibrated": {
            "kernels": "bits=4,granularity='group',group_size=16",
            "activation_bits": 8,
            "calibration_batches": 2,
        },
        "lsq_w4": {"kernels": "bits=4,scale_method='lsq'", "embeddings": "bits=8"},
        "fp8_w_a8": {
            "kernels": "scheme='fp8'",
            "activation_bits": 8,
            "activation_scheme": "fp8",
            "calibration_batches": 2,
        },
    },
}
# A config of each section that switches the method off, and one at zero strength that must
# leave the model exactly as it is (None: the method has no zero strength but "off").
ZERO = {
    "share": {"groups": "every:1"},  # each layer its own group
    "prune": {"method": "magnitude", "sparsity": 0.0},
    "quantize": None,
}
METHODS = {m.section: m for m in TRAINING_METHODS}
IDS = [f"{section}-{name}" for section, cases in CASES.items() for name in cases]
PARAMS = [(section, changes) for section, cases in CASES.items() for changes in cases.values()]


def section(name: str, changes: dict):
    cfg = finetune_defaults()[name]
    with cfg.unlocked():
        for key, value in changes.items():
            setattr(cfg, key, value)
    return cfg


def no_saved_model(path):
    pytest.fail(f"no saved model in this test ({path})")


def setup(config, batch) -> Setup:
    model = Bert(config)
    return Setup(
        total_steps=4,
        seed=0,
        batches=lambda n: [batch] * n,
        apply_fn=lambda p, b: logits(config, p, b),
        loss_fn=lambda p, b: objectives.finetune_loss(model)(p, b, None)[0],
        layer_types=(Linear,),
        load_params=no_saved_model,
    )


def test_every_registered_method_has_cases():
    assert set(METHODS) == set(CASES) == set(ZERO)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_default_section_is_off_and_zero_strength_is_identity(name):
    method = METHODS[name]
    assert method.parse(finetune_defaults()[name]) is None
    if ZERO[name] is None:
        return
    config, params, batch = model_and_batch()
    spec = method.parse(section(name, ZERO[name]))
    prepared = method.prepare(spec, params, no_saved_model)
    plan = method.plan(spec, prepared, setup(config, batch))
    seen = plan.reparam.apply(prepared, plan.reparam.init(prepared))
    jax.tree.map(np.testing.assert_array_equal, seen, params)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "changes"), PARAMS, ids=IDS)
def test_method_trains_through_the_loop_step_and_exports(name, changes, tmp_path):
    method = METHODS[name]
    config, params, batch = model_and_batch()
    spec = method.parse(section(name, changes))
    prepared = method.prepare(spec, params, no_saved_model)
    plan = method.plan(spec, prepared, setup(config, batch))
    # As the loop does: the plans' reparams chained (here one) inside the optimizer state.
    reparam = core.chain(plan.reparam)
    rates = method.extra_rates(spec)
    tx = core.with_reparam(
        reparam, make_optimizer(finetune_defaults().train, 4, NOT_WEIGHTS, rates)
    )
    state = TrainState(jnp.array(0), prepared, tx.init(prepared), new_rng(0))
    seen = core.reparam_apply(state.params, state.opt_state)
    assert core.leaf_paths(core.strip_extra_leaves(seen)) == core.leaf_paths(params)
    model = plan.model(Bert(config))
    # The method changes what the model computes, and the same under jit as eagerly.
    float_logits = logits(config, params, batch)
    eager = model.apply({"params": seen}, batch["input_ids"], batch["attention_mask"])
    assert float(jnp.max(jnp.abs(eager.logits - float_logits))) > 1e-4
    jitted = jax.jit(lambda p, o: core.reparam_apply(p, o))(state.params, state.opt_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), jitted, seen)

    step = make_train_step(objectives.finetune_loss(model), tx, plans=(plan,))
    for _ in range(3):  # warmup starts at learning rate 0
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
        assert np.isfinite(float(metrics["loss"]))
    if plan.metrics is not None:
        assert set(plan.metrics(core.reparam_state(state.opt_state).state[0])) <= set(metrics)
    if plan.penalty is not None:  # its logged terms reach the step's metrics
        assert set(plan.penalty(state.params)[1]) <= set(metrics)

    exported = core.finalize(state.params, state.opt_state)
    assert jax.tree.map(jnp.shape, exported) == jax.tree.map(jnp.shape, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(exported))
    figures = plan.export(state.params, core.reparam_state(state.opt_state).state[0], tmp_path)
    assert figures["bytes"] > 0 and any(tmp_path.rglob("*.safetensors"))
