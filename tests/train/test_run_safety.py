"""A newcomer's first hour: bad values fail early, workdirs recover, checkpoints survive
corruption, metrics log each step once, and long work reports progress."""

import json
import logging
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.config import finetune_defaults, validate
from jaxcompress.errors import UserError
from jaxcompress.experiments import recipes
from jaxcompress.experiments.latency import inference_latency
from jaxcompress.train import checkpoint, progress
from jaxcompress.train import loop as train
from jaxcompress.train.run_dir import RunDir, read_metrics
from tests.helpers import save_tiny_model, tiny_config, tiny_run_config

BAD_VALUES = [
    ("train.batch_size", -8),
    ("train.batch_size", 0),
    ("checkpoint_every", 0),
    ("log_every", 0),
    ("eval.batch_size", 0),
    ("eval.examples", 0),
    ("train.examples", -5),
    ("train.lr", -1e-3),
    ("train.epochs", -1.0),
    ("train.grad_accum", 3),
    ("checkpoint_keep", 1),
    ("dropout", 1.0),
    ("prune.sparsity", 1.0),
    ("prune.method", "magnitud"),
    ("prune.scope", "globl"),
    ("prune.movement", "medium"),
    ("dtype", "float64"),
    ("rng_impl", "philox"),
    ("distill.logit_loss", "kld"),
    ("distill.hidden_loss", "l1"),
    ("distill.layer_map", "every"),
    ("early_exit.targets", "teachers"),
    ("early_exit.weighting", "linear"),
    ("early_exit.pooling", "max"),
    ("quantize.activation_ranges", "static"),
    ("buckets", (16, 0)),
]


def with_value(config, key: str, value):
    node = config
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    with config.unlocked():
        node[last] = value
    return config


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_value_fails_before_anything_is_written(tmp_path, glue_dir, key, value):
    config = with_value(tiny_run_config(tmp_path / "model", glue_dir), key, value)
    if key == "train.epochs":  # epochs count only without train.steps
        with_value(config, "train.steps", -1)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        train.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_defaults_are_valid_and_epochs_may_be_zero_with_steps():
    config = finetune_defaults()
    validate(config)
    with config.unlocked():
        config.train.epochs, config.train.steps = 0.0, 10
    validate(config)


def test_a_recipe_is_validated_before_its_first_stage_runs(tmp_path):
    def stage(name, lr):
        return {"name": name, "kind": "finetune", "config": {"model": "m", "train": {"lr": lr}}}

    recipe = {"task": "sst2", "stages": (stage("first", 1e-4), stage("second", -1.0))}
    with pytest.raises(UserError, match=r"stage second: config key train\.lr=-1\.0"):
        recipes.run_recipe(recipe, tmp_path / "recipe")
    assert not (tmp_path / "recipe").exists()


def test_workdir_without_checkpoint_takes_a_corrected_config(tmp_path):
    config = finetune_defaults()
    RunDir(tmp_path, config).log(step=1, loss=1.0)  # a run that failed before its checkpoint
    corrected = with_value(finetune_defaults(), "train.lr", 1e-4)
    RunDir(tmp_path, corrected)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 1e-4
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # now it has one: refused
    with pytest.raises(UserError, match=r"different config \(keys \['train\.lr'\]\)"):
        RunDir(tmp_path, config)


def test_reporting_settings_may_change_on_resume(tmp_path):
    RunDir(tmp_path, finetune_defaults())
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    changed = finetune_defaults()
    for key, value in [
        ("log_every", 7),
        ("checkpoint_every", 9),
        ("checkpoint_keep", 3),
        ("eval.batch_size", 16),
        ("eval.every_steps", 5),
        ("compile_cache", ""),
        ("mesh.data", 1),
    ]:
        with_value(changed, key, value)
    RunDir(tmp_path, changed)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["log_every"] == 7 and saved["eval"]["batch_size"] == 16
    # With transforms, eval.batch_size sets the batches transforms measure: results change.
    transformed = with_value(finetune_defaults(), "transforms", ("keep_layers(keep=1)",))
    RunDir(tmp_path / "t", transformed)
    (tmp_path / "t" / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(UserError, match=r"keys \['eval\.batch_size'\]"):
        RunDir(tmp_path / "t", with_value(transformed, "eval.batch_size", 16))


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
    assert read_metrics(tmp_path) == []  # nothing logged yet
    run = RunDir(tmp_path, finetune_defaults())
    for step in (1, 2, 3):
        run.log(step=step, loss=1.0)
    run.log(step=3, eval={"validation": {"accuracy": 0.5}})
    assert read_metrics(tmp_path)[-1]["eval"] == {"validation": {"accuracy": 0.5}}
    run.drop_rows_after(3, final_eval=True)
    rows = read_metrics(tmp_path)
    assert [(r["step"], "eval" in r) for r in rows] == [(1, False), (2, False), (3, False)]
    run.drop_rows_after(1)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def corrupt(step_dir: Path, how: str) -> None:
    if how == "truncated":  # every array data file cut in half, as a full disk would
        for root, _, files in os.walk(step_dir):
            for name in files:
                path = Path(root) / name
                if path.parent.name == "d":
                    with open(path, "r+b") as f:
                        f.truncate(path.stat().st_size // 2)
    else:
        (step_dir / "default" / "_METADATA").write_text("garbage{")


@pytest.mark.parametrize("how", ["truncated", "metadata"])
def test_restore_skips_a_corrupt_latest_step(tmp_path, caplog, how):
    state = {"w": jnp.arange(64.0), "step": jnp.array(0)}
    mngr = checkpoint.manager(tmp_path / "checkpoints", keep=3)
    for step in (1, 2):
        checkpoint.save(mngr, step, jax.tree.map(lambda x, s=step: x + s, state))
    corrupt(tmp_path / "checkpoints" / "2", how)
    with caplog.at_level(logging.WARNING, logger="jaxcompress"):
        restored = checkpoint.restore_latest(checkpoint.manager(tmp_path / "checkpoints"), state)
    np.testing.assert_array_equal(restored["w"], np.arange(64.0) + 1)
    assert f"{tmp_path / 'checkpoints' / '2'} cannot be restored" in caplog.text
    assert "skipping it" in caplog.text
    mngr = checkpoint.manager(tmp_path / "checkpoints", keep=3)
    assert mngr.all_steps() == [1]  # step 2 moved aside, so the run can save it again
    checkpoint.save(mngr, 2, state)
    corrupt(tmp_path / "checkpoints" / "1", how)
    corrupt(tmp_path / "checkpoints" / "2", how)
    with pytest.raises(UserError, match=f"no checkpoint in {tmp_path / 'checkpoints'}"):
        checkpoint.restore_latest(checkpoint.manager(tmp_path / "checkpoints"), state)


def test_results_table_has_no_duplicate_student_row_and_a_total_time():
    finetune = {"stage": "student", "kind": "finetune", "source": "teacher", "metric": "acc"}
    finetune |= {"value": 0.8, "params": 1e6, "bytes": 4e6, "wall_seconds": 200.0}
    rows = [
        {"model": "@student", "metric": "acc", "value": 0.8, "relative": 0.9, "params": 1e6},
        {"model": "/models/teacher", "metric": "acc", "value": 0.9, "relative": 1.0, "params": 2e6},
    ]
    evaluate = {"stage": "evaluate", "kind": "evaluate", "rows": rows, "wall_seconds": 52.0}
    table = recipes.results_table([finetune, evaluate])
    lines = table.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["evaluate", "evaluate"]
    assert lines[4:] == ["", "total time: 4 min 12 s"]


def test_latency_reports_progress(caplog, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    config = tiny_config(num_hidden_layers=1)
    from jaxcompress.models.bert import init_params

    params = init_params(config, jax.random.key(0))
    with caplog.at_level(logging.INFO, logger="jaxcompress"):
        inference_latency(config, params, batch_size=2, seq_len=8, repeats=2, warmup=1)
    assert "latency 2 x 8: 3 passes" in caplog.text
    assert "latency 2 x 8: 1/3 passes" in caplog.text
    assert "latency 2 x 8: done, 3 passes in" in caplog.text


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_dir):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", minilm_dir, num_labels=2)


def tiny(tiny_model, glue_dir, **changes):
    config = tiny_run_config(tiny_model, glue_dir, **changes)
    with config.unlocked():
        config.buckets = (64,)  # one compiled program
        config.log_every = 1
        config.checkpoint_every = 2
    return config


# orbax leaves an asyncio callback behind when a read of the truncated file fails
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_resumes_from_the_previous_and_logs_each_step_once(
    tmp_path, tiny_model, glue_dir, caplog, monkeypatch
):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    config = tiny(tiny_model, glue_dir, steps=4)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="jaxcompress"):
        assert train.train(config, workdir, stop_after_step=3) == {"stopped_at": 3, "steps": 4}
    messages = caplog.messages
    assert "compiling train step for batch 8 x 64 ..." in messages
    assert sum(m.startswith("compiling train step") for m in messages) == 1  # one bucket
    assert any(m.startswith("compiled train step in ") for m in messages)
    assert any(m.startswith("step 2/4 loss ") and m.endswith(" left") for m in messages)

    corrupt(workdir / "checkpoints" / "3", "truncated")  # row 3 is logged, its state lost
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxcompress"):
        summary = train.train(config, workdir)
    assert "resumed from step 2" in caplog.messages
    assert "skipping it" in caplog.text
    assert "compiling eval step for batch 128 x 64 ..." in caplog.messages
    assert any(m.startswith("predict 128 examples: done, 1 batch in") for m in caplog.messages)
    assert summary["steps"] == 4 and summary["wall_seconds"] > 0
    # This invocation compiled the train step (for the resumed steps) and the eval step.
    compiled = summary["compile_seconds"]
    assert 0 < compiled["train"] < summary["wall_seconds"] and compiled["eval"] > 0

    again = train.train(config, workdir)  # finished: the saved summary, nothing logged
    assert again["value"] == summary["value"]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval" in r] == [4]
    with pytest.raises(UserError, match="different config"):
        train.train(tiny(tiny_model, glue_dir, steps=4, lr=1e-4), workdir)


def test_a_long_compilation_is_reported_while_it_runs(caplog, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.05)
    reminded = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("still compiling"):
                reminded.set()

    def slow_compile(x):  # returns once the announcer has said it is still compiling
        assert reminded.wait(60)
        return x + 1

    log = logging.getLogger("jaxcompress.test")
    log.addHandler(watch := Watch())
    announce = progress.CompileAnnouncer(log, "train step")
    try:
        with caplog.at_level(logging.INFO, logger="jaxcompress.test"):
            assert announce((8, 64), slow_compile, jnp.ones(2))[0] == 2.0
            announce((8, 64), lambda x: x, jnp.ones(2))  # a known shape: nothing logged
    finally:
        log.removeHandler(watch)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "compiling train step for batch 8 x 64 ..."
    assert all(x.startswith("still compiling train step for batch 8 x 64 (") for x in lines[1:-1])
    assert len(lines) >= 3 and lines[-1].startswith("compiled train step in ")


def test_progress_lines_come_before_the_interval_would_pass():
    progress_seconds = progress.PROGRESS_SECONDS
    assert not progress.due(progress_seconds - 5.0, 1.0)
    assert progress.due(progress_seconds - 1.0, 1.0)  # one more step would overshoot
    assert progress.due(progress_seconds, 0.0)
