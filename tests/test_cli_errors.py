"""Each user mistake is one line on stderr and exit status 2, before any training."""

import json
import logging
import os
import stat
from pathlib import Path

import jax
import pytest
from huggingface_hub import constants

from jaxcompress import assets
from jaxcompress.cli import main
from jaxcompress.config import finetune_defaults
from jaxcompress.models.bert import init_params
from jaxcompress.models.hf import resolve_model_dir, save_pretrained
from tests.helpers import REPO, save_tiny_model, tiny_config

FINETUNE = f"{REPO}/configs/finetune.py"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, and no jaxcompress.toml of the checkout: the tests run in tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(assets.CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tiny(tmp_path, minilm_dir) -> Path:
    return save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2)


def error(capsys, argv: list[str], *words: str) -> str:
    """Run the command; assert status 2, one stderr line naming `words`; return the line."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"jaxcompress {argv[0]}: error: "), line
    for word in words:
        assert word in line, (word, line)
    return line


def test_missing_model_directory(capsys, tmp_path):
    error(capsys, ["eval", "--model", str(tmp_path / "nope"), "--task", "sst2"], "does not exist")


def test_unknown_model_name_offline(capsys):
    line = error(capsys, ["eval", "--model", "no-such-model", "--task", "sst2"], "'no-such-model'")
    assert "HF_HUB_OFFLINE" in line and "model_root" in line and "all-MiniLM-L6-v2" in line


def test_unreachable_hub_is_reported_at_once(capsys, monkeypatch, tiny):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("JAXCOMPRESS_GLUE_DIR")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    words = ("'nyu-mll/glue'", "does not answer at http://127.0.0.1:9", "glue_dir")
    error(capsys, ["eval", "--model", str(tiny), "--task", "sst2"], *words)


def test_offline_dataset_names_glue_dir(capsys, monkeypatch, tiny):
    monkeypatch.delenv("JAXCOMPRESS_GLUE_DIR")
    words = ("'nyu-mll/glue'", "HF_HUB_OFFLINE", "glue_dir in jaxcompress.toml")
    error(capsys, ["eval", "--model", str(tiny), "--task", "sst2"], *words)


def test_config_json_not_json_or_missing_keys(capsys, tiny):
    config = tiny / "config.json"
    hf = json.loads(config.read_text())
    config.write_text("{\n  'hidden_size': 32\n")
    error(capsys, ["eval", "--model", str(tiny), "--task", "sst2"], str(config), "line 2", "JSON")
    del hf["hidden_size"]
    config.write_text(json.dumps(hf))
    error(capsys, ["eval", "--model", str(tiny), "--task", "sst2"], str(config), "'hidden_size'")


def test_truncated_safetensors_names_the_file(capsys, tiny):
    weights = tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    error(capsys, ["eval", "--model", str(tiny), "--task", "sst2"], str(weights), "truncated")


def test_pickle_checkpoint_suggests_safetensors(capsys, tiny):
    (tiny / "model.safetensors").unlink()
    (tiny / "pytorch_model.bin").write_bytes(b"not read")
    line = error(capsys, ["eval", "--model", str(tiny), "--task", "sst2"], "pytorch_model.bin")
    assert "convert it to model.safetensors" in line and "allow_pickle" not in line


def _sst2_dir(root: Path, dev: bytes) -> Path:
    (root / "SST-2").mkdir(parents=True)
    (root / "SST-2" / "dev.tsv").write_bytes(dev)
    return root


def test_non_utf8_tsv_names_file_and_line(capsys, tmp_path, tiny):
    glue = _sst2_dir(tmp_path / "glue", b"sentence\tlabel\ngood\t1\nbad caf\xe9\t0\n")
    args = ["eval", "--model", str(tiny), "--task", "sst2", "--glue-dir", str(glue)]
    error(capsys, args, str(glue / "SST-2" / "dev.tsv"), "line 3", "0xe9", "not UTF-8")


def test_missing_glue_file(capsys, tmp_path, tiny):
    args = ["eval", "--model", str(tiny), "--task", "cola", "--glue-dir", str(tmp_path)]
    error(capsys, args, str(tmp_path / "CoLA" / "dev.tsv"), "glue_dir")


def test_unknown_split_lists_the_task_splits(capsys, tiny):
    args = ["eval", "--model", str(tiny), "--task", "sst2", "--split", "test"]
    error(capsys, args, "split 'test'", "train, validation")


def test_unknown_task_lists_the_known_ones(capsys, tiny):
    error(capsys, ["eval", "--model", str(tiny), "--task", "sst-2"], "'sst-2'", "sst2, ", "wnli")


def test_label_count_that_does_not_fit_the_task(capsys, tmp_path, minilm_dir):
    three = save_tiny_model(tmp_path / "three", minilm_dir, num_labels=3)
    error(capsys, ["eval", "--model", str(three), "--task", "sst2"], "3-output head", "needs 2")


def _finetune(config: str, workdir: Path, *overrides: str) -> list[str]:
    sets = [x for o in overrides for x in ("--set", o)]
    return ["finetune", "--config", config, "--workdir", str(workdir), *sets]


def test_config_file_mistakes(capsys, tmp_path):
    run = tmp_path / "run"
    error(capsys, _finetune(str(tmp_path / "none.py"), run), "none.py", "does not exist")
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections\ndef get_config(arg=''):\n    return {\n")
    error(capsys, _finetune(str(bad), run), str(bad), "line 3", "syntax error")
    bad.write_text("x = 1\n")
    error(capsys, _finetune(str(bad), run), str(bad), "get_config")
    bad.write_text(
        "import ml_collections\n"
        "def get_config(arg=''):\n"
        "    return ml_collections.ConfigDict({'train': {'lrr': 1e-4}})\n"
    )
    error(capsys, _finetune(str(bad), run), str(bad), "'train.lrr'", "did you mean 'lr'")
    assert not run.exists()


def test_override_mistakes_and_unknown_flag(capsys, tmp_path):
    run = tmp_path / "run"
    error(capsys, _finetune(FINETUNE, run, "task=3"), "'task' is str", "got int 3")
    error(capsys, _finetune(FINETUNE, run, "train.lrr=1"), "'train.lrr'", "did you mean 'lr'")
    error(capsys, _finetune(FINETUNE, run, "train.lr"), "key=value")
    error(capsys, _finetune(f"{FINETUNE}:sst2,quik", run), "unknown flags ['quik']", "quick")
    error(capsys, _finetune(f"{FINETUNE}:sst-2", run), "unknown GLUE task 'sst-2'", "sst2, ")
    assert not run.exists()


def test_unwritable_workdir_is_reported_first(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    error(capsys, _finetune(FINETUNE, blocker / "run"), str(blocker / "run"), "not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    recipe = f"{REPO}/configs/recipes/sst2.py:distil_l3,quick"
    args = ["recipe", "--config", recipe, "--workdir", str(locked / "run")]
    error(capsys, args, str(locked / "run"), "not writable")


def test_sweep_argument_mistakes(capsys, tmp_path):
    sweep = f"{REPO}/configs/ablations/sst2.py:main"
    args = ["sweep", sweep, "--workdir", str(tmp_path / "s")]
    error(capsys, args + ["--only", "technique"], "--only 'technique'", "AXIS=VALUE")
    error(capsys, args + ["--shard", "x"], "--shard 'x'", "INDEX/COUNT")


def test_report_says_what_the_directory_is(capsys, tmp_path):
    recipe = tmp_path / "recipe"
    (recipe / "student").mkdir(parents=True)
    (recipe / "student" / "summary.json").write_text(json.dumps({"steps": 3}))
    (recipe / "results.md").write_text("| stage |\n")
    line = error(capsys, ["report", str(recipe)], "recipe workdir", "results.md")
    assert "format" not in line and "rerun" not in line.lower()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    error(capsys, ["report", str(run)], "finetune run directory", "jaxcompress eval")
    (tmp_path / "empty").mkdir()
    error(capsys, ["report", str(tmp_path / "empty")], "no run summaries", "jaxcompress sweep")


def test_export_of_a_non_run_or_a_run_without_checkpoint(capsys, tmp_path, tiny):
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    error(capsys, ["export", "--workdir", str(tmp_path / "empty"), "--out", out], "not a run")
    error(capsys, ["export", "--workdir", str(tiny), "--out", out], "is a model directory")
    run = tmp_path / "run"
    run.mkdir()
    config = finetune_defaults().to_dict()
    (run / "config.json").write_text(json.dumps(config))
    error(capsys, ["export", "--workdir", str(run), "--out", out], "no checkpoint", "finetune")


def test_settings_file_found_upwards_and_relative(monkeypatch, tmp_path, model_root):
    monkeypatch.delenv("JAXCOMPRESS_MODEL_ROOT")
    monkeypatch.delenv("JAXCOMPRESS_GLUE_DIR")
    (tmp_path / "glue").mkdir()
    (tmp_path / "jaxcompress.toml").write_text(
        f"model_root = {str(model_root)!r}\nglue_dir = 'glue'\n"
    )
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")
    assert assets.glue_dir() == tmp_path / "glue"
    assert resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2") == (
        model_root / "all-MiniLM-L6-v2"
    )
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", "/env/wins")
    assert assets.glue_dir() == Path("/env/wins")
    named = tmp_path / "elsewhere.toml"
    named.write_text("glue_dir = 'glue'\n")
    monkeypatch.setenv(assets.CONFIG_ENV, str(named))
    assert assets.settings_file_value("glue_dir") == (named, tmp_path / "glue")


def test_settings_file_with_a_missing_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("JAXCOMPRESS_MODEL_ROOT")
    settings = tmp_path / "jaxcompress.toml"
    settings.write_text("model_root = 'models'\n")
    words = (str(settings), "model_root = 'models'", "does not exist")
    error(capsys, ["eval", "--model", "minilm-l6-sst2-teacher", "--task", "sst2"], *words)
    settings.write_text("model_root = \n")
    error(capsys, ["eval", "--model", "minilm-l6-sst2-teacher", "--task", "sst2"], "not valid TOML")


def test_export_names_labels_and_respects_umask(tmp_path):
    config = tiny_config(num_labels=2)
    old = os.umask(0o022)
    try:
        params = init_params(config, jax.random.key(0))
        out = save_pretrained(config, params, tmp_path / "exported", label_names=["a", "b"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    hf = json.loads((out / "config.json").read_text())
    assert hf["id2label"] == {"0": "a", "1": "b"} and hf["label2id"] == {"a": 0, "b": 1}


def test_tpu_backend_message_is_silenced(capsys, tmp_path):
    main(["report", str(tmp_path)])
    assert logging.getLogger("jax._src.xla_bridge").level == logging.WARNING


def test_broken_jaxcompress_model_directories(capsys, tmp_path):
    model = tmp_path / "compressed"
    model.mkdir()
    (model / "jaxcompress_config.json").write_text('{"hidden": 3}')
    args = ["eval", "--model", str(model), "--task", "sst2"]
    error(capsys, args, str(model / "params.safetensors"), "does not exist")
    (model / "params.safetensors").write_bytes(b"\0\0")
    error(capsys, args, str(model / "jaxcompress_config.json"), "unknown key 'hidden'")
    (model / "jaxcompress_config.json").write_text("{}")
    error(capsys, args, str(model / "params.safetensors"), "truncated")
