"""Meshes, sharding rules, gradient accumulation, loss scaling, remat; sharded training on
8 simulated CPU devices equals one device."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.dynamic_scale import DynamicScale
from jax.sharding import AbstractMesh, PartitionSpec
from safetensors.numpy import load_file

from jaxcompress import core
from jaxcompress.compress.distill.objective import finetune_loss
from jaxcompress.compress.prune import unstructured as prune
from jaxcompress.config import finetune_defaults
from jaxcompress.models.bert import Bert, init_params
from jaxcompress.train import grads, sharding
from jaxcompress.train import loop as train
from jaxcompress.train.step import TrainState, make_optimizer, make_train_step, new_rng
from tests.helpers import REPO, save_tiny_model, simulated_devices_env, tiny_config, tiny_run_config
from tests.sharded_training import CASES, STEPS

P = PartitionSpec
MIXED = AbstractMesh((2, 2, 2), sharding.AXES)


def test_mesh_shape_fills_one_axis_and_rejects_misfits():
    assert sharding.mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert sharding.mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        sharding.mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape((-1, -1, 1), 8)


def test_parameters_follow_the_rules_and_odd_dimensions_stay_whole():
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    specs = sharding.param_specs(config, params, MIXED)
    layer = specs["bert"]["encoder"]["layer"]["0"]
    assert layer["attention"]["self"]["query"]["kernel"] == P("fsdp", "tensor")
    assert layer["attention"]["output"]["dense"]["kernel"] == P("tensor", "fsdp")
    assert layer["attention"]["output"]["LayerNorm"]["scale"] == P("fsdp")
    assert layer["intermediate"]["dense"]["kernel"] == P("fsdp", "tensor")
    assert specs["bert"]["embeddings"]["word_embeddings"] == P("tensor", "fsdp")  # 30522 = 2k
    assert specs["classifier"]["kernel"] == P("tensor", None)  # 2 classes: never split
    odd_config = tiny_config(intermediate_size=33)  # 33 FFN neurons do not split in two
    odd = sharding.param_specs(odd_config, init_params(odd_config, jax.random.key(0)), MIXED)
    ffn = odd["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]
    assert ffn["kernel"] == P("fsdp", None) and ffn["bias"] == P(None)


def test_compression_state_inherits_its_weights_sharding():
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    rules = [(r"bert/encoder/.*/kernel", True), (".*", None)]
    with_scores = prune.add_movement_scores(params, rules)
    specs = sharding.param_specs(config, with_scores, MIXED)
    query = specs["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    assert query["kernel@movement_score"] == query["kernel"] == P("fsdp", "tensor")
    # A per-output-channel scale keeps the output axis; a group-wise one drops the input axis.
    assert sharding.inherit_spec(P("fsdp", "tensor"), (32, 64), (64,)) == P("tensor")
    assert sharding.inherit_spec(P("fsdp", "tensor"), (32, 64), (2, 64)) == P(None, "tensor")
    assert sharding.inherit_spec(P("fsdp", "tensor"), (32, 64), ()) == P()
    # Masks: like their parameter; the scalar mask of an unpruned leaf is replicated.
    masks = jax.tree.map(lambda x: np.ones((), bool), params)
    masks["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"] = np.ones(
        (32, 32), bool
    )
    model_specs = sharding.param_specs(config, params, MIXED)
    mask_specs = sharding.state_specs(masks, params, model_specs)
    assert mask_specs["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"] == (
        P("fsdp", "tensor")
    )
    assert mask_specs["bert"]["pooler"]["dense"]["kernel"] == P()


def test_optimizer_moments_follow_their_parameters():
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    specs = sharding.param_specs(config, params, MIXED)
    tx = make_optimizer(finetune_defaults().train, 10)
    opt_specs = sharding.state_specs(jax.eval_shape(tx.init, params), params, specs)
    adam = next(s for s in jax.tree.leaves(opt_specs, is_leaf=lambda x: hasattr(x, "mu")))
    assert adam.mu == specs and adam.nu == specs and adam.count == P()
    # Inside `with_reparam`: the pruning masks follow their weights too, counters replicate.
    rules = [(r"bert/encoder/.*/kernel", True), (".*", None)]
    pruning = prune.magnitude_pruning(rules, prune.Schedule(final=0.5))
    wrapped = core.with_reparam(pruning, tx)
    opt_specs = sharding.state_specs(jax.eval_shape(wrapped.init, params), params, specs)
    masks = opt_specs.state.masks
    query = ["bert", "encoder", "layer", "0", "attention", "self", "query"]
    assert functools.reduce(dict.get, query, masks)["kernel"] == P("fsdp", "tensor")
    assert masks["bert"]["pooler"]["dense"]["kernel"] == P()  # not pruned: a scalar mask
    assert opt_specs.step == P() and opt_specs.state.target == P()


def _quadratic_objective(params, batch, rng):
    del rng
    err = batch["x"] @ params["w"] - batch["y"]
    per_example = jnp.sum(err**2, axis=-1)
    mask = batch["example_mask"]
    loss = jnp.sum(per_example * mask) / jnp.sum(mask)
    return loss, {"mean_err": jnp.sum(err.mean(-1) * mask) / jnp.sum(mask)}


def test_accumulated_gradients_equal_the_full_batch_with_padding_rows():
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(8, 3)).astype(np.float32),
        "y": rng.normal(size=(8, 2)).astype(np.float32),
        "example_mask": np.array([1, 1, 1, 1, 1, 0, 1, 0], np.float32),  # uneven per micro
    }
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    key = jax.random.key(0)
    (loss, aux), g = grads.value_and_grad(_quadratic_objective)(params, batch, key)
    for count in (2, 4):
        (loss_k, aux_k), g_k = grads.value_and_grad(_quadratic_objective, count)(params, batch, key)
        np.testing.assert_allclose(loss_k, loss, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(aux_k["mean_err"], aux["mean_err"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_k["w"], g["w"], rtol=1e-5, atol=1e-7)
    micro = grads.micro_batches(batch, 2)
    np.testing.assert_array_equal(micro["x"][1], batch["x"][1::2])
    with pytest.raises(ValueError, match="does not split into 3"):
        grads.micro_batches(batch, 3)


def test_loss_scaling_matches_flax_dynamic_scale_and_unscales_gradients():
    params = jnp.array([1.0, -2.0])

    def objective(p, batch, rng):
        return jnp.sum(p**2), {}

    dyn = DynamicScale(growth_interval=2, scale=8.0)
    for finite in (True, True, True, False):
        fun = lambda p, f=finite: jnp.sum(p**2) * (1.0 if f else jnp.inf)  # noqa: E731
        expected, is_fin, _, _ = dyn.value_and_grad(fun)(params)
        ours = grads.next_loss_scale(dyn, jnp.array(finite))
        assert bool(is_fin) == finite
        assert float(ours.scale) == float(expected.scale)
        assert int(ours.fin_steps) == int(expected.fin_steps)
        dyn = ours
    (_, _), g = grads.value_and_grad(objective, 1, jnp.float32(1024.0))(params, {}, None)
    np.testing.assert_allclose(g, 2 * params, atol=1e-7)


@pytest.mark.slow
def test_float16_step_skips_non_finite_gradients():
    config = tiny_config(num_labels=2, dtype="float16")
    params = init_params(config, jax.random.key(0))
    tx = make_optimizer(finetune_defaults().train, 10)
    state = TrainState(
        jnp.array(0), params, tx.init(params), new_rng(0), DynamicScale(scale=2.0**40)
    )
    step = make_train_step(finetune_loss(Bert(config)), tx)
    batch = {
        "input_ids": np.full((2, 8), 1000, np.int32),
        "attention_mask": np.ones((2, 8), np.int32),
        "token_type_ids": np.zeros((2, 8), np.int32),
        "labels": np.array([0, 1], np.int32),
        "example_mask": np.ones(2, np.float32),
    }
    before = jax.tree.map(np.asarray, params)
    state, metrics = step(state, batch)  # 2**40 overflows float16: skipped, scale halved
    assert not bool(metrics["finite"])
    assert float(state.loss_scale.scale) == 2.0**39
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.params))


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    config = tiny_config(num_labels=2, vocab_size=2048)
    params = init_params(config, jax.random.key(0))
    batch = {
        "input_ids": np.arange(16, dtype=np.int32).reshape(2, 8) + 1000,
        "attention_mask": np.ones((2, 8), np.int32),
        "token_type_ids": np.zeros((2, 8), np.int32),
        "labels": np.array([0, 1], np.int32),
        "example_mask": np.ones(2, np.float32),
    }
    key = jax.random.key(1)
    plain = jax.jit(jax.value_and_grad(finetune_loss(Bert(config)), has_aux=True))
    remat = jax.jit(
        jax.value_and_grad(finetune_loss(Bert(config.replace(remat=True))), has_aux=True)
    )
    (a, _), ga = plain(params, batch, key, None)
    (b, _), gb = remat(params, batch, key, None)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(optax.tree.norm(ga), optax.tree.norm(gb), rtol=1e-5, atol=1e-6)


def test_bad_mesh_and_batch_splits_fail_before_training(tmp_path, minilm_dir, glue_dir):
    model_dir = save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2)
    config = tiny_run_config(model_dir, glue_dir, steps=2)
    with config.unlocked():
        config.mesh.data = 2  # one device here
    with pytest.raises(ValueError, match="does not fit 1 devices"):
        train.train(config, tmp_path / "run")
    with config.unlocked():
        config.mesh.data, config.train.grad_accum = -1, 3
    with pytest.raises(ValueError, match="must divide train.batch_size"):
        train.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _start(devices: int, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.sharded_training", *args]
    env = simulated_devices_env(devices)
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _report(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    line = next(x for x in stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


@pytest.mark.devices8
def test_sharded_training_equals_one_device(tmp_path, minilm_dir, glue_dir):
    model = save_tiny_model(tmp_path / "model", minilm_dir, num_labels=2)
    teacher = save_tiny_model(tmp_path / "teacher", minilm_dir, seed=1, num_labels=2)
    args = (str(model), str(teacher), str(glue_dir))
    # Both at once: each spends most of its time compiling on one thread, and the raised
    # collective timeouts keep the 8 device threads in step on the shared cores.
    one = _start(1, *args, str(tmp_path / "one"), "reference")
    eight = _start(8, *args, str(tmp_path / "eight"), "meshes")
    reference, meshes = _report(one), _report(eight)
    assert reference["devices"] == 1 and meshes["devices"] == 8
    expected_runs = {"methods/mixed": "methods", "finetune/fsdp-then-tensor": "resumed"}
    fresh = meshes.pop("init_sharded")  # initialised directly split over an 8-way FSDP mesh
    assert fresh["max_abs_diff"] < 1e-6 and fresh["split"] > 0.5 * fresh["leaves"]
    assert set(meshes) - {"devices"} == set(expected_runs)
    for name, run_dir in expected_runs.items():
        case = name.split("/")[0]
        assert len(meshes[name]["losses"]) == STEPS, name
        np.testing.assert_allclose(
            meshes[name]["losses"], reference[case]["losses"], rtol=1e-5, err_msg=name, atol=1e-6
        )
        ours = load_file(tmp_path / "eight" / run_dir / "model" / "model.safetensors")
        theirs = load_file(tmp_path / "one" / case / "model" / "model.safetensors")
        for key in theirs:
            np.testing.assert_allclose(ours[key], theirs[key], atol=1e-5, err_msg=(name, key))
    assert set(CASES) == {n.split("/")[0] for n in expected_runs}
