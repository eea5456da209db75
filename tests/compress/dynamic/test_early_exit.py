"""Early exit: exit heads, losses, policies, and the regrouping runner against the full model."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxcompress.compress.distill.objective import EXITS, forward
from jaxcompress.compress.dynamic import early_exit
from jaxcompress.compress.dynamic.early_exit import (
    ExitHead,
    ExitRunner,
    Policy,
    PolicyState,
    decide,
)
from jaxcompress.config import finetune_defaults
from jaxcompress.models.bert import Bert, init_params
from jaxcompress.train.loop import train
from tests.helpers import (
    REPO,
    compressed_tiny_config,
    save_tiny_model,
    tiny_config,
    tiny_run_config,
)


def batch_of(rows: int = 6, length: int = 10, padding_rows: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, length), np.int32)
    for r in range(rows):
        mask[r, rng.integers(3, length + 1) :] = 0
    example_mask = np.ones(rows, np.float32)
    example_mask[rows - padding_rows :] = 0
    return {
        "input_ids": rng.integers(1000, 5000, (rows, length)).astype(np.int32) * mask,
        "attention_mask": mask,
        "token_type_ids": np.zeros((rows, length), np.int32),
        "labels": rng.integers(0, 2, rows).astype(np.int32),
        "example_mask": example_mask,
    }


def model_with_exits(config, layers, seed=0):
    params = init_params(config, jax.random.key(seed))
    exits = early_exit.init_exits(config, params, layers)
    # Distinct random heads, so every exit predicts differently.
    keys = iter(jax.random.split(jax.random.key(seed + 1), 4 * len(exits)))
    exits = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(next(keys), x.shape), exits)
    return params, exits


def head_outputs(config, params, exits, batch, pooling="cls"):
    """Every exit's logits (and the model's) from one full forward pass."""
    out = forward(Bert(config), params, batch, None, output_hidden_states=True)
    head = ExitHead(config, pooling)
    tokens = batch["attention_mask"]
    each = {
        int(n): np.asarray(head.apply({"params": e}, out.hidden_states[int(n)], tokens))
        for n, e in exits.items()
    }
    each[config.num_hidden_layers] = np.asarray(out.logits)
    return each


@pytest.mark.parametrize("compressed", [False, True])
def test_a_threshold_that_never_exits_equals_the_full_model(compressed):
    config = (
        compressed_tiny_config() if compressed else tiny_config(num_labels=2, num_hidden_layers=3)
    )
    params, exits = model_with_exits(config, (1, 2))
    batch = batch_of()
    logits, layers_run = ExitRunner(config, params, exits).run(batch, Policy("entropy", 0.0))
    full = np.asarray(forward(Bert(config), params, batch, None).logits)
    real = batch["example_mask"] > 0
    np.testing.assert_allclose(logits[real], full[real], atol=1e-5)
    assert (layers_run[real] == config.num_hidden_layers).all() and (layers_run[~real] == 0).all()


@pytest.mark.parametrize(
    "policy, pooling",
    [
        (Policy("entropy", 0.6), "cls"),
        (Policy("entropy", 0.6), "mean"),
        (Policy("entropy", 10.0), "cls"),
        (Policy("patience", 2), "mean"),
        (Policy("budget", 2), "cls"),
    ],
)
def test_every_example_gets_the_head_output_of_the_layer_it_left_at(policy, pooling):
    config = tiny_config(num_labels=2, num_hidden_layers=4)
    params, exits = model_with_exits(config, (1, 2, 3))
    batch = batch_of(rows=16, padding_rows=3, seed=1)
    logits, layers_run = ExitRunner(config, params, exits, pooling).run(batch, policy)
    each = head_outputs(config, params, exits, batch, pooling)
    real = np.flatnonzero(batch["example_mask"] > 0)
    for row in real:
        np.testing.assert_allclose(logits[row], each[layers_run[row]][row], atol=1e-5)
    if policy == Policy("entropy", 10.0):  # two classes: entropy <= ln 2 < 10, all leave at 1
        assert (layers_run[real] == 1).all()
    if policy.kind == "budget":
        assert (layers_run[real] == 2).all()
    if policy == Policy("entropy", 0.6):
        assert len(set(layers_run[real])) > 1  # the batch really splits


def test_patience_exits_exactly_when_k_consecutive_exits_agree():
    # Predictions of three examples at exits 1..4: 0 0 ..., 0 1 1 ..., 1 0 1 0.
    predictions = np.array([[0, 0, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]])
    policy = Policy("patience", 2)
    state = PolicyState.start(3)
    exited_at = np.zeros(3, int)
    for layer in range(1, 5):
        logits = np.eye(2)[predictions[:, layer - 1]] * 3.0
        leaving = decide(policy, logits, layer, state) & (exited_at == 0)
        exited_at[leaving] = layer
    np.testing.assert_array_equal(exited_at, [2, 3, 0])
    with pytest.raises(ValueError, match="whole number"):
        Policy("patience", 1.5)
    with pytest.raises(ValueError, match="policy kind"):
        Policy("confidence", 0.5)


def test_entropy_matches_its_definition():
    logits = np.array([[0.0, 0.0], [10.0, -10.0], [1.0, 2.0]])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        early_exit.entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-6, atol=1e-7
    )
    assert abs(early_exit.entropy(logits)[0] - np.log(2)) < 1e-9


def test_exit_losses_match_their_definitions_and_bad_settings_fail():
    config = tiny_config(num_labels=2, num_hidden_layers=3)
    params, exits = model_with_exits(config, (1, 2))
    batch = batch_of()
    each = head_outputs(config, params, exits, batch)
    real = batch["example_mask"] > 0

    def ce(logits):
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -log_p[np.arange(len(logits)), batch["labels"]][real].mean()

    def kl(target, logits):
        log_t = target - np.log(np.exp(target).sum(-1, keepdims=True))
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return (np.exp(log_t) * (log_t - log_p)).sum(-1)[real].mean()

    trainable = {**params, EXITS: exits}
    # PABEE: jointly, every exit and the last layer's head, exit n weighing n.
    cfg = early_exit_config(layers=(1, 2), weighting="layer", freeze_backbone=False)
    loss, aux = early_exit.make_exit_loss(Bert(config), cfg)(trainable, batch, None)
    expected = (ce(each[1]) + 2 * ce(each[2]) + 3 * ce(each[3])) / 6
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    assert set(aux) == {"exit1_loss", "exit2_loss", "exit3_loss"}
    # FastBERT: frozen backbone, exits distilled from the model's own prediction.
    cfg = early_exit_config(layers=(1, 2), targets="final")
    loss, _ = early_exit.make_exit_loss(Bert(config), cfg)(trainable, batch, None)
    expected = (kl(each[3], each[1]) + kl(each[3], each[2])) / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="distinct layers in 1..2"):
        early_exit.make_exit_loss(Bert(config), early_exit_config(layers=(3,)))
    with pytest.raises(ValueError, match="needs distill.teacher"):
        early_exit.make_exit_loss(Bert(config), early_exit_config(layers=(1,), targets="teacher"))


def early_exit_config(**changes) -> early_exit.ExitSpec:
    cfg = finetune_defaults().early_exit
    with cfg.unlocked():
        cfg.update(changes)
    return early_exit.ExitSpec.from_config(cfg)


@pytest.mark.slow
def test_training_exit_heads_leaves_a_frozen_backbone_unchanged(tmp_path, minilm_dir, glue_dir):
    model_dir = save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2)
    config = tiny_run_config(model_dir, glue_dir, steps=3)
    with config.unlocked():
        config.buckets = (64,)
        config.early_exit.layers = (1,)
        config.early_exit.pooling = "mean"
    summary = train(config, tmp_path / "run")
    before = load_file(model_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert set(summary["exit_accuracy"]) == {"1", "2"}
    saved_config, backbone, exits, pooling = early_exit.load_exit_model(tmp_path / "run" / "exits")
    assert set(exits) == {"1"} and pooling == "mean"
    start = early_exit.model_head(backbone)
    assert not np.array_equal(exits["1"]["classifier"]["kernel"], start["classifier"]["kernel"])
    batch = batch_of(length=16)
    runner = ExitRunner(saved_config, backbone, exits, pooling)
    logits, layers_run = runner.run(batch, Policy("entropy", 0.0))
    assert (layers_run[batch["example_mask"] > 0] == 2).all() and np.isfinite(logits).all()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("loss" in json.loads(x) for x in lines)


def test_dynamic_configs_load_under_the_strict_defaults():

    from jaxcompress.config import load_config

    spec = str(REPO / "configs" / "dynamic.py")
    labels = load_config(f"{spec}:exits_labels")
    assert labels.early_exit.layers == (1, 2, 3, 4, 5) and labels.early_exit.freeze_backbone
    assert load_config(f"{spec}:exits_final").early_exit.targets == "final"
    power = load_config(f"{spec}:power_strong,quick,teacher=/x")
    assert len(power.token_keep) == 6 and power.distill.teacher == "/x" and power.train.steps == 2
    with pytest.raises(ValueError, match="unknown dynamic config"):
        load_config(f"{spec}:power_extreme")
