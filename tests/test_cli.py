"""The `jaxcompress` command end to end on a tiny model: finetune, eval, export."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxcompress.cli import main
from jaxcompress.models import artefact
from jaxcompress.models.bert import init_params
from jaxcompress.models.hf import save_pretrained
from tests.helpers import REPO, save_tiny_model, tiny_config


@pytest.mark.slow
def test_finetune_eval_export(tmp_path, minilm_dir, glue_dir, capsys, monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    model = save_tiny_model(tmp_path / "tiny", minilm_dir)
    workdir = tmp_path / "run"
    overrides = [
        f"model={model}",
        "train.examples=64",
        "train.batch_size=16",
        "train.steps=3",
        "checkpoint_every=2",
        "eval.batch_size=128",
        "eval.examples=128",
    ]
    args = ["finetune", "--config", f"{REPO}/configs/finetune.py:sst2", "--workdir", str(workdir)]
    assert main(args + [x for o in overrides for x in ("--set", o)]) == 0
    table = capsys.readouterr().out
    summary = json.loads((workdir / "summary.json").read_text())
    assert f"| validation | accuracy | {summary['value']:.4f} |" in table

    evaluate = ["eval", "--model", str(workdir / "model"), "--task", "sst2", "--examples", "128"]
    assert main(evaluate) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated == summary["eval"]

    # the train split: the numbers of a glue folder whose dev file is that train slice
    train_rows = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines(keepends=True)[:129]
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("".join(train_rows))
    on_train = json.loads(_eval(capsys, evaluate + ["--split", "train", "--split", "validation"]))
    assert list(on_train) == ["train", "validation"]
    assert on_train["validation"] == summary["eval"]["validation"]
    as_dev = json.loads(_eval(capsys, evaluate + ["--glue-dir", str(tmp_path / "glue")]))
    assert on_train["train"] == as_dev["validation"]

    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "exported")]) == 0
    a = load_file(workdir / "model" / "model.safetensors")
    b = load_file(tmp_path / "exported" / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_bad_override_fails_before_writing(tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["finetune", "--config", f"{REPO}/configs/finetune.py", "--workdir", str(workdir)]
    assert main(args + ["--set", "train.lrr=1e-3"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    with pytest.raises(KeyError, match="did you mean 'lr'"):  # --debug: the exception itself
        main(["--debug", *args, "--set", "train.lrr=1e-3"])
    assert not workdir.exists()


@pytest.mark.slow
def test_export_of_a_run_with_distillation_projections(tmp_path, minilm_dir, glue_dir, monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    teacher = save_tiny_model(tmp_path / "teacher", minilm_dir, num_labels=2)
    workdir = tmp_path / "run"
    overrides = [
        f"model={teacher}",
        f"distill.teacher={teacher}",
        "distill.hidden=1.0",
        "transforms=['shrink_width(hidden_size=16, num_heads=2)']",
        "train.examples=32",
        "train.batch_size=16",
        "train.steps=2",
        "checkpoint_every=1",
        "max_length=64",
        "buckets=(64,)",  # one compiled shape
        "eval.examples=128",
    ]
    args = ["finetune", "--config", f"{REPO}/configs/finetune.py:sst2", "--workdir", str(workdir)]
    assert main(args + [x for o in overrides for x in ("--set", o)]) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    trained = load_file(workdir / "model" / "model.safetensors")
    assert exported.keys() == trained.keys()  # the projection is not part of the model
    np.testing.assert_array_equal(exported["classifier.weight"], trained["classifier.weight"])


def _eval(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_eval_reads_a_jaxcompress_model_as_its_hugging_face_twin(
    tmp_path, minilm_dir, glue_dir, capsys
):
    config = tiny_config(num_labels=2)
    params = init_params(config, jax.random.key(0))
    hf = save_pretrained(config, params, tmp_path / "hf", tokenizer_dir=minilm_dir)
    ours = artefact.save(config, params, tmp_path / "ours", tokenizer_dir=minilm_dir)
    argv = ["--task", "sst2", "--split", "train", "--examples", "64", "--glue-dir", str(glue_dir)]
    on_hf = json.loads(_eval(capsys, ["eval", "--model", str(hf), *argv]))
    assert on_hf == json.loads(_eval(capsys, ["eval", "--model", str(ours), *argv]))
    assert 0.0 <= on_hf["train"]["accuracy"] <= 1.0
