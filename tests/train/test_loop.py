"""The fine-tuning loop on a tiny model and real SST-2 slices: resume, NaN stop, determinism."""

import json
import logging

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxcompress.config import finetune_defaults
from jaxcompress.train import checkpoint
from jaxcompress.train.loop import train
from jaxcompress.train.run_dir import RunDir
from jaxcompress.train.step import make_optimizer
from tests.helpers import save_tiny_model, tiny_run_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_dir):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", minilm_dir)


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identically(tmp_path, tiny_model, glue_dir, caplog):
    config = tiny_run_config(tiny_model, glue_dir)
    with config.unlocked():
        config.precompile = "on"  # compiled ahead: the same programs, the same numbers
    with caplog.at_level(logging.INFO, logger="jaxcompress"):
        straight = train(config, tmp_path / "straight")
    # one train and one eval program, both compiled ahead and none when first called
    assert "compiled 2 programs ahead (('train', 64), ('eval', 64))" in caplog.text
    assert "compiling train step" not in caplog.text and "compiling eval" not in caplog.text
    assert straight["compile_seconds"]["ahead"] > 0
    with config.unlocked():
        config.precompile = "off"
    partial = train(config, tmp_path / "resumed", stop_after_step=3)  # mid-epoch (4 steps/epoch)
    assert partial == {"stopped_at": 3, "steps": 6}
    assert not (tmp_path / "resumed" / "summary.json").exists()
    with config.unlocked():
        config.precompile = "on"  # may change on resume; compiles for steps 4 to 6
    resumed = train(config, tmp_path / "resumed")
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert straight["eval"] == resumed["eval"]
    before = load_file(tiny_model / "model.safetensors")
    assert not np.array_equal(before["bert.pooler.dense.weight"], a["bert.pooler.dense.weight"])
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_examples"] == 32
    assert 0.0 <= summary["value"] <= 1.0 and summary["config"]["task"] == "sst2"
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in x] == [2, 4, 6]


@pytest.mark.slow
def test_cached_teacher_logits_train_like_the_live_teacher(
    tmp_path, tiny_model, glue_dir, minilm_dir
):
    teacher = save_tiny_model(tmp_path / "teacher", minilm_dir, seed=1, num_labels=2)
    config = tiny_run_config(tiny_model, glue_dir, steps=2)
    with config.unlocked():
        config.distill.teacher = str(teacher)
    train(config, tmp_path / "live")
    with config.unlocked():
        config.distill.cache_logits = True
        config.precompile = "on"  # batches carrying teacher logits compile ahead too
    train(config, tmp_path / "cached")

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if "loss" in x]

    np.testing.assert_allclose(losses("cached"), losses("live"), rtol=1e-4, atol=1e-5)
    with config.unlocked():
        config.distill.hidden = 1.0
    with pytest.raises(ValueError, match="caches logits only"):
        train(config, tmp_path / "layers")


@pytest.mark.slow
def test_same_seed_same_result_other_seed_differs(tmp_path, tiny_model, glue_dir):
    config = tiny_run_config(tiny_model, glue_dir, steps=2)
    first = train(config, tmp_path / "a")
    again = train(config, tmp_path / "b")
    assert first["eval"] == again["eval"]
    with config.unlocked():
        config.seed = 1
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    train(config, tmp_path / "c")
    c = load_file(tmp_path / "c" / "model" / "model.safetensors")
    assert not np.array_equal(a["classifier.weight"], c["classifier.weight"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model, glue_dir):
    # Warmup starts at lr 0, so step 1 is harmless and checkpointed; step 2 overflows.
    config = tiny_run_config(tiny_model, glue_dir, lr=1e38, warmup_ratio=0.5)
    with config.unlocked():
        config.checkpoint_every = 1
        config.log_every = 100
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(config, tmp_path / "run")
    mngr = checkpoint.manager(tmp_path / "run" / "checkpoints")
    assert not (tmp_path / "run" / "model").exists()
    assert mngr.latest_step() == 1
    leaves = jax.tree_util.tree_leaves(mngr.restore(1)["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_run_dir_refuses_a_different_config(tmp_path, tiny_model, glue_dir):
    config = tiny_run_config(tiny_model, glue_dir, steps=1)
    train(config, tmp_path / "run")
    other = tiny_run_config(tiny_model, glue_dir, steps=2)
    with pytest.raises(ValueError, match="different config"):
        train(other, tmp_path / "run")


def test_run_dir_reads_older_configs_under_todays_defaults(tmp_path):
    config = finetune_defaults()
    RunDir(tmp_path, config)
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # a run with a checkpoint to keep
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["distill"]["hidden"]  # written before the key existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    RunDir(tmp_path, config)  # the missing key has today's default: same run
    with config.unlocked():
        config.distill.hidden = 1.0
    with pytest.raises(ValueError, match="different config"):
        RunDir(tmp_path, config)


def test_schedule_warms_up_then_decays_to_zero():
    import jax.numpy as jnp

    train_cfg = finetune_defaults().train
    tx = make_optimizer(train_cfg, 100)
    params = {"w": jnp.ones(3), "bias": jnp.ones(3)}
    state = tx.init(params)
    lrs = []
    for _ in range(100):
        grads = {"w": jnp.ones(3), "bias": jnp.ones(3)}
        updates, state = tx.update(grads, state, params)
        lrs.append(float(-updates["bias"][0]))  # no weight decay on biases: |update| ~ lr
    assert lrs[0] == pytest.approx(0.0, abs=1e-9)
    assert max(lrs) == pytest.approx(train_cfg.lr, rel=0.02)
    assert int(np.argmax(lrs)) == 6  # 6% warmup
    assert lrs[-1] < train_cfg.lr * 0.02


def test_missing_model_fails_before_writing_anything(tmp_path, glue_dir):
    config = tiny_run_config(tmp_path / "no_such_model", glue_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
