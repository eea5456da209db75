"""Recipes: stage checking, `@stage` chaining, resuming, and the results table."""

import json

import pytest

from jaxcompress.cli import main
from jaxcompress.compress.dynamic import early_exit
from jaxcompress.experiments import recipes
from jaxcompress.models import artefact
from jaxcompress.train import loop as train
from jaxcompress.train.inputs import load_any
from tests.helpers import save_tiny_model

SMALL_RUN = {"examples": 64, "batch_size": 16, "steps": 2}


def finetune_stage(name, model, teacher, transforms=(), **distill):
    return {
        "name": name,
        "kind": "finetune",
        "config": {
            "model": model,
            "transforms": transforms,
            "distill": {"teacher": teacher, **distill},
            "train": SMALL_RUN,
            "eval": {"batch_size": 128},
            "checkpoint_every": 1,
            "max_length": 64,
            "buckets": (64,),  # one compiled shape per program
        },
    }


def test_bad_recipes_fail_naming_the_stage():
    ok = finetune_stage("a", "m", "")
    with pytest.raises(ValueError, match="kind 'distil'"):
        recipes.check_recipe({"task": "sst2", "stages": ({"name": "a", "kind": "distil"},)})
    with pytest.raises(KeyError, match="stage a: unknown keys \\['steps'\\]"):
        recipes.check_recipe({"task": "sst2", "stages": ({**ok, "steps": 3},)})
    with pytest.raises(ValueError, match="@later, which is not an earlier stage"):
        recipes.check_recipe({"task": "sst2", "stages": (finetune_stage("a", "@later", ""),)})
    with pytest.raises(ValueError, match="two stages are named 'a'"):
        recipes.check_recipe({"task": "sst2", "stages": (ok, ok)})
    with pytest.raises(KeyError, match="task"):
        recipes.check_recipe({"stages": (), "tasks": "sst2"})


@pytest.mark.slow
def test_chained_recipe_resumes_and_tabulates(tmp_path, minilm_dir, glue_dir, monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    teacher = str(save_tiny_model(tmp_path / "teacher", minilm_dir, num_labels=2))
    recipe = {
        "task": "sst2",
        "stages": (
            finetune_stage(
                "student", teacher, teacher, ("keep_layers(keep=1)",), hidden=1.0, attention=1.0
            ),
            finetune_stage("prediction", "@student", teacher, alpha=1.0),
            {"name": "evaluate", "kind": "evaluate", "models": ("@prediction", teacher)},
            {"name": "export", "kind": "export", "model": "@student"},
        ),
    }
    workdir = tmp_path / "recipe"

    # Interrupt the second stage after one step, as a preemption would.
    real_train = train.train

    def preempted(config, run, **kwargs):
        return real_train(config, run, stop_after_step=1 if run.name == "prediction" else None)

    monkeypatch.setattr(train, "train", preempted)
    partial = recipes.run_recipe(recipe, workdir)
    assert [s["stage"] for s in partial] == ["student"]
    assert not (workdir / "evaluate").exists()
    student_log = (workdir / "student" / "metrics.jsonl").read_text()

    monkeypatch.setattr(train, "train", real_train)
    summaries = recipes.run_recipe(recipe, workdir)
    assert [s["stage"] for s in summaries] == ["student", "prediction", "evaluate", "export"]
    assert (workdir / "student" / "metrics.jsonl").read_text() == student_log  # not retrained
    prediction_log = (workdir / "prediction" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in prediction_log if "loss" in line] == [1, 2]

    config, params = artefact.load(recipes.stage_model(workdir / "student"))
    assert config.num_hidden_layers == 1 and "distill" not in params
    rows = summaries[2]["rows"]
    assert rows[-1]["relative"] == 1.0 and rows[0]["params"] < rows[1]["params"]
    assert rows[0]["value"] == summaries[1]["value"]  # evaluated again, same number
    table = recipes.results_table(summaries)
    # prediction's own row is left out: the evaluate stage measures @prediction
    assert table.count("\n| ") == 4 and "| evaluate | teacher |" in table
    assert "| prediction |" not in table and "\n\ntotal time: " in table
    exported, _ = load_any(str(workdir / "export" / "model"))
    assert exported.num_hidden_layers == 1  # a Hugging Face directory of the student

    # A rerun of a finished recipe trains nothing and gives the same table, via the CLI too.
    recipe_file = tmp_path / "recipe.py"
    recipe_file.write_text(f"def get_config(arg):\n    return {recipe!r}\n")
    assert main(["recipe", "--config", str(recipe_file), "--workdir", str(workdir)]) == 0
    assert (workdir / "results.md").read_text().strip() == table


@pytest.mark.slow
def test_dynamic_inference_stages_on_a_distilled_student(
    tmp_path, minilm_dir, glue_dir, monkeypatch
):
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    teacher = str(save_tiny_model(tmp_path / "teacher", minilm_dir, num_labels=2))
    exits = finetune_stage("exits", "@student", "")
    exits["config"]["early_exit"] = {"layers": (1,), "targets": "labels"}
    power = finetune_stage("power", "@student", "@student", alpha=1.0)
    power["config"]["token_keep"] = (1.0, 0.5)
    recipe = {
        "task": "sst2",
        "stages": (
            finetune_stage("student", teacher, teacher, ("low_rank(target='ffn', fraction=0.5)",)),
            exits,
            power,
        ),
    }
    for stage in recipe["stages"]:
        stage["config"]["eval"] = {"batch_size": 128, "examples": 128}  # one eval batch
    summaries = recipes.run_recipe(recipe, tmp_path / "recipe")
    assert [s["stage"] for s in summaries] == ["student", "exits", "power"]
    config, _, exits, _ = early_exit.load_exit_model(tmp_path / "recipe" / "exits" / "exits")
    assert config.low_rank and set(exits) == {"1"}  # the compressed student's shape
    trained = json.loads((tmp_path / "recipe" / "exits" / "summary.json").read_text())
    assert set(trained["exit_accuracy"]) == {"1", "2"}
    power_config, _ = artefact.load(recipes.stage_model(tmp_path / "recipe" / "power"))
    assert power_config.token_keep == (1.0, 0.5)
