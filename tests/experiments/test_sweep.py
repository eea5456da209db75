"""Sweeps: hash-keyed runs, shared stages, resuming after a kill with identical reports."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxcompress import config as config_module
from jaxcompress.compress import transforms
from jaxcompress.compress.gradual_sharing import SHARING
from jaxcompress.compress.prune.method import PRUNING
from jaxcompress.compress.quant.method import QUANTIZATION
from jaxcompress.experiments import recipes, report, sweep
from jaxcompress.models import artefact
from jaxcompress.train.inputs import load_any, transform_context
from tests.helpers import REPO, save_tiny_model

SWEEP_FILE = """
def get_config(teacher):
    stage = {
        "name": "student",
        "kind": "finetune",
        "config": {
            "model": teacher,
            "distill": {"teacher": teacher, "cache_logits": True},
            "train": {"batch_size": 16, "steps": 4, "examples": 64},
            "checkpoint_every": 2,
            "max_length": 64,
            "buckets": (64,),
            "eval": {"examples": 128},
        },
    }
    def rank(fraction):
        return {"student": {"transforms": (f"low_rank(fraction={fraction})",)}}
    return {
        "name": "two_ranks",
        "recipe": {"task": "sst2", "stages": (stage,)},
        "variants": {"low_rank": {"r50": rank(0.5), "r25": rank(0.25)}},
        "seeds": (0,),
        "measure": "student",
        "reference": teacher,
    }
"""


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, minilm_dir):
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    return str(save_tiny_model(path, minilm_dir, num_labels=2))


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "two_ranks.py"
    path.write_text(SWEEP_FILE)
    return path


def _unfinished_checkpoint(workdir: Path) -> bool:
    """Whether some stage has checkpointed but not finished, after a run has finished."""
    if not list(workdir.glob("runs/*/summary.json")):
        return False
    return any(
        not (stage / "summary.json").exists() and any((stage / "checkpoints").glob("[0-9]*"))
        for stage in workdir.glob("stages/*")
    )


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_report(
    tmp_path, sweep_file, tiny_teacher, glue_dir, monkeypatch
):
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    env = {**os.environ, "JAXCOMPRESS_GLUE_DIR": str(glue_dir)}
    spec = f"{sweep_file}:{tiny_teacher}"
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "jaxcompress.cli", "sweep", spec, "--workdir", str(killed)]
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not _unfinished_checkpoint(killed):
        if process.poll() is not None:
            pytest.fail(f"sweep ended before it could be killed: {process.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "no checkpoint appeared within 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    config = sweep.load_sweep(spec)
    runs = sweep.expand(config)
    unfinished = [r for r in runs if not (killed / "runs" / r.dir_name / "summary.json").exists()]
    assert len(unfinished) == 1  # the first run finished, the second was killed mid-way

    resumed = sweep.run_sweep(config, killed)
    # The killed run once more, uninterrupted (the finished one was never resumed).
    (run,) = unfinished
    only = {"technique": [run.technique], "strength": [run.strength]}
    (fresh,) = sweep.run_sweep(config, tmp_path / "fresh", only=only)
    assert len(resumed) == 2
    assert sorted(p.name for p in (killed / "runs").iterdir()) == sorted(r.dir_name for r in runs)
    (ours,) = [s for s in resumed if s["key"] == run.key]
    assert ours["eval"] == fresh["eval"] and ours["value"] == fresh["value"]  # bit-identical
    reports = [
        report.write_report([d], tmp_path / f"report_{d.name}", plots=False)
        for d in (killed, tmp_path / "fresh")
    ]
    rows = [r["written"][1].read_text().splitlines() for r in reports]
    assert len(rows[0]) == 3 and len(rows[1]) == 2  # header + 2 variants; header + 1
    assert rows[1][1] in rows[0]  # the killed run's row, as its uninterrupted run reports it
    # A finished sweep is not rerun: the same summaries come back.
    assert sweep.run_sweep(config, killed) == json.loads(json.dumps(resumed))


@pytest.mark.slow
def test_shared_stage_runs_once_and_latency_is_paired(
    tmp_path, tiny_teacher, glue_dir, monkeypatch
):
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    small = {"batch_size": 16, "steps": 2, "examples": 32}
    short = {"max_length": 64, "buckets": (64,), "eval": {"examples": 128}}
    recipe = {
        "task": "sst2",
        "stages": (
            {
                "name": "teacher",
                "kind": "finetune",
                "config": {"model": tiny_teacher, "train": small, **short},
            },
            {
                "name": "student",
                "kind": "finetune",
                "config": {
                    "model": "@teacher",
                    "distill": {"teacher": "@teacher"},
                    "train": small,
                    **short,
                },
            },
        ),
    }

    def shrink(transform):
        return {"student": {"transforms": (transform,)}}

    config = {
        "name": "shared",
        "recipe": recipe,
        "variants": {
            "shrink": {
                "l1": shrink("keep_layers(keep=1)"),
                "r25": shrink("low_rank(fraction=0.25)"),
            }
        },
        "seeds": (3,),
        "measure": "student",
        "reference": "@teacher",
        "latency": True,
    }
    summaries = sweep.run_sweep(config, tmp_path)
    stages = sorted(p.name.split("-")[0] for p in (tmp_path / "stages").iterdir())
    assert stages == ["student", "student", "teacher"]  # the teacher is fine-tuned once
    teacher = json.loads(next((tmp_path / "stages").glob("teacher-*/summary.json")).read_text())
    for s in summaries:
        assert s["reference"]["value"] == teacher["value"]
        assert s["config"]["recipe"]["stages"][1]["config"]["seed"] == 3
        assert "seed" not in s["config"]["recipe"]["stages"][0]["config"]
        assert s["latency_s"] > 0 and s["reference_latency_s"] > 0 and s["speedup"] > 0
        assert s["relative"] == s["value"] / teacher["value"]
    assert [s["params"] < teacher["params"] for s in summaries] == [True, True]
    for s in summaries:  # what each stage trained, kept in the run's own summary
        assert [r["stage"] for r in s["training"]] == ["teacher", "student"]
        for record in s["training"]:
            assert (record["steps"], record["train_examples"], record["epochs"]) == (2, 32, 1.0)
            assert record["configured"] == {
                "steps": 2,
                "epochs": 1.0,
                "examples": 32,
                "batch_size": 16,
            }
        assert s["training"][0]["dev"] == [{"step": 2, "accuracy": teacher["value"]}]
        assert s["training"][1]["dev"] == [{"step": 2, "accuracy": s["value"]}]
    assert report.training_stages(summaries[0]) == [
        {"stage": name, "steps": 2, "batch_size": 16, "train_examples": 32}
        for name in ("teacher", "student")
    ]


def test_stage_keys_follow_changes_and_ignore_new_defaults(monkeypatch):
    recipe = {
        "task": "sst2",
        "stages": (
            {"name": "a", "kind": "finetune", "config": {"model": "m"}},
            {"name": "b", "kind": "finetune", "config": {"model": "@a"}},
        ),
    }
    keys = sweep.stage_keys(recipe)
    changed = sweep.apply_variant(recipe, {"a": {"train": {"lr": 1e-3}}}, 0, ())
    new_keys = sweep.stage_keys(changed)
    assert new_keys["a"] != keys["a"] and new_keys["b"] != keys["b"]  # b reads a's output
    assert sweep.stage_keys(recipe, ["train.steps=5"])["a"] != keys["a"]

    real_defaults = config_module.finetune_defaults

    def grown():
        defaults = real_defaults()
        defaults.new_option = 0
        return defaults

    monkeypatch.setattr(sweep, "finetune_defaults", grown)
    assert sweep.stage_keys(recipe) == keys


def _minimal(**changes) -> dict:
    stage = {"name": "student", "kind": "finetune", "config": {"model": "m"}}
    config = {
        "name": "x",
        "recipe": {"task": "sst2", "stages": (stage,)},
        "variants": {"t": {"s": {"student": {"train": {"lr": 1e-4}}}}},
        "measure": "student",
        "reference": "m",
    }
    return {**config, **changes}


def test_bad_sweeps_fail_clearly():
    sweep.check_sweep(_minimal())
    with pytest.raises(ValueError, match=r"unknown sweep axis \['layer'\]"):
        sweep.expand(_minimal(), only={"layer": ["1"]})
    with pytest.raises(ValueError, match=r"no run has strength in \['z'\]"):
        sweep.expand(_minimal(), only={"strength": ["z"]})
    with pytest.raises(KeyError, match="unknown sweep key"):
        sweep.check_sweep(_minimal(grid={}))
    with pytest.raises(ValueError, match="variant t/s changes stage 'teacher'"):
        sweep.check_sweep(_minimal(variants={"t": {"s": {"teacher": {}}}}))
    with pytest.raises(KeyError, match=r"variant t/s: .*'tarin'"):
        sweep.check_sweep(_minimal(variants={"t": {"s": {"student": {"tarin": {}}}}}))
    with pytest.raises(ValueError, match="measure: no stage named 'x'"):
        sweep.check_sweep(_minimal(measure="x"))
    with pytest.raises(ValueError, match="shard 2/2"):
        sweep.run_sweep(_minimal(), "/nonexistent", shard=(2, 2))


def _summary(technique, strength, seed, value, base="b", task="sst2", **extra) -> dict:
    return {
        "format": sweep.FORMAT,
        "base": base,
        "technique": technique,
        "strength": strength,
        "seed": seed,
        "position": [0, 0 if strength == "big" else 1],
        "task": task,
        "metric": "accuracy",
        "value": value,
        "params": 500,
        "bytes": 2000,
        "bytes_no_embeddings": 1000,
        "reference": {
            "model": "teacher",
            "value": 0.9,
            "params": 1000,
            "bytes": 4000,
            "bytes_no_embeddings": 4000,
        },
        **extra,
    }


def _write_runs(directory: Path, summaries: list[dict]) -> Path:
    for i, s in enumerate(summaries):
        (directory / "runs" / f"run{i}").mkdir(parents=True)
        (directory / "runs" / f"run{i}" / "summary.json").write_text(json.dumps(s))
    return directory


def test_report_aggregates_over_seeds(tmp_path):
    runs = [_summary("t", "big", s, v, speedup=2.0) for s, v in [(0, 0.8), (1, 0.9)]]
    runs.append(_summary("t", "small", 0, 0.7, speedup=3.0))
    written = report.write_report([_write_runs(tmp_path / "a", runs)], tmp_path / "out")
    big, small = written["rows"]
    assert (big["strength"], small["strength"]) == ("big", "small")
    assert big["mean"] == pytest.approx(0.85) and big["std"] == pytest.approx(0.0707107, 1e-5)
    assert big["relative"] == pytest.approx(0.85 / 0.9) and big["seeds"] == [0, 1]
    assert big["size"] == 0.5 and big["size_no_embeddings"] == 0.25 and big["speedup"] == 2.0
    row = report.result_row(big)
    assert (row["name"], row["value"], row["seeds"], row["values"]) == (
        "t big",
        big["mean"],
        2,
        [0.8, 0.9],
    )
    assert (row["bytes_relative"], row["bytes_relative_no_embeddings"]) == (0.5, 0.25)
    assert row["latency_ratio"] == {"cpu": 2.0, "gpu": None}
    assert row["remaining_params"] == row["params"] == big["params"]
    lines = written["table"].splitlines()
    assert lines[0].startswith("| model | params | size % | size % (no emb.) | speedup | SST-2")
    assert lines[2] == "| reference (teacher) | 0.0M | 100 | 100 | 1.00x | 90.00 | 0 |"
    assert lines[3] == "| t big | 0.0M | 50.0 | 25.0 | 2.00x | 85.00 ± 7.07 (n=2) | 5.00 |"
    assert lines[4] == "| t small | 0.0M | 50.0 | 25.0 | 3.00x | 70.00 ± 0.00 (n=1) | 20.00 |"
    assert written["written"][2].name == "out_sst2.png"
    assert written["written"][2].read_bytes()[:4] == b"\x89PNG"


def test_learning_curves_read_the_trained_stage_evaluations():
    def run(strength, seed, evals):
        # the measured stage stores the trained one in fewer bytes: the curve is the student's
        recipe = {"stages": [{"name": "student", "kind": "finetune"}, {"name": "shared"}]}
        recipe["stages"][1]["kind"] = "transform"
        config = {"measure": "shared", "recipe": recipe}
        dev = [{"step": step, "accuracy": value} for step, value in evals]
        training = [{"stage": "student", "steps": evals[-1][0], "dev": dev}]
        return _summary("t", strength, seed, evals[-1][1], config=config, training=training)

    runs = [
        run("big", 0, [(10, 0.6), (20, 0.7)]),
        run("big", 1, [(10, 0.5), (20, 0.8)]),
        run("small", 0, [(20, 0.9)]),  # evaluated only at the end: no curve
    ]
    assert report.learning_curves(runs) == {"t big": {0: {10: 0.6, 20: 0.7}, 1: {10: 0.5, 20: 0.8}}}


def test_archived_runs_come_back_as_finished_runs(tmp_path):
    workdir, archive = tmp_path / "runs", tmp_path / "archive"
    runs = [_summary("t", "big", seed, 0.5 + seed / 10) for seed in (0, 1)]
    _write_runs(workdir, runs)
    assert sweep.archive_runs(workdir, archive) == 2
    assert sweep.archive_runs(workdir, archive) == 0  # already there
    fresh = tmp_path / "fresh"
    assert sweep.restore_runs(archive, fresh) == 2
    assert sweep.restore_runs(archive, fresh) == 0
    for done in sorted(workdir.glob("runs/*/summary.json")):
        assert (fresh / "runs" / done.parent.name / "summary.json").read_bytes() == (
            done.read_bytes()
        )
    table = report.write_report([fresh], tmp_path / "out", plots=False)["table"]
    assert table == report.write_report([workdir], tmp_path / "out", plots=False)["table"]


def test_report_averages_the_models_that_have_every_task(tmp_path):
    runs = [
        _summary("t", "big", 0, 0.8, task="sst2", speedup=2.0),
        _summary("t", "big", 0, 0.4, task="cola", speedup=4.0),
        _summary("t", "small", 0, 0.7, task="sst2", speedup=3.0),  # no cola: not averaged
    ]
    runs[1]["reference"] = {**runs[1]["reference"], "value": 0.5, "model": "cola_teacher"}
    written = report.write_report(
        [_write_runs(tmp_path / "a", runs)], tmp_path / "out", allow_mixed=True
    )
    averaged, reference = report.average_rows(written["rows"], written["references"])
    assert [(r["technique"], r["strength"]) for r in averaged] == [("t", "big")]
    assert averaged[0]["mean"] == pytest.approx(0.6) and averaged[0]["speedup"] == 3.0
    assert reference["value"] == pytest.approx(0.7)
    assert [p.name for p in written["written"][2:]] == [
        "out_cola.png",
        "out_sst2.png",
        "out_average.png",
    ]
    lines = written["table"].splitlines()
    assert lines[2].startswith("| reference (each task's teacher) | 0.0M | 100 |")
    big = next(x for x in lines if x.startswith("| t big"))
    assert big.endswith("| 10.00 |")  # drops 10 (sst2) and 10 (cola) points


def test_report_counts_the_parameters_pruning_kept(tmp_path):
    runs = [
        _summary("magnitude", "big", s, 0.8, remaining_params=kept * 1_000_000)
        for s, kept in [(0, 2), (1, 3)]
    ]
    written = report.write_report(
        [_write_runs(tmp_path / "a", runs)], tmp_path / "out", plots=False
    )
    assert written["rows"][0]["remaining_params"] == 2_500_000
    assert written["table"].splitlines()[3].startswith("| magnitude big | 2.5M | 50.0 |")


def test_report_refuses_mixed_bases_and_other_formats(tmp_path):
    a = _write_runs(tmp_path / "a", [_summary("t", "big", 0, 0.8, base="one")])
    b = _write_runs(tmp_path / "b", [_summary("t", "big", 1, 0.9, base="two")])
    with pytest.raises(ValueError, match="2 different base configs"):
        report.collect([a, b])
    assert len(report.collect([a, b], allow_mixed=True)) == 2
    assert [s["value"] for s in report.collect([a, b], base="two")] == [0.9]
    with pytest.raises(FileNotFoundError, match="no run summaries of base three"):
        report.collect([a, b], base="three")
    old = _write_runs(tmp_path / "old", [{**_summary("t", "big", 0, 0.8), "format": 0}])
    with pytest.raises(ValueError, match="sweep format 0; this jaxcompress reads format 1"):
        report.collect([old])
    with pytest.raises(FileNotFoundError, match="no run summaries"):
        report.collect([tmp_path / "a" / "runs" / "run0"])


def test_pareto_front():
    points = [(100, 0.9), (50, 0.88), (60, 0.85), (25, 0.80), (25, 0.70), (10, 0.5)]
    assert report.pareto_front(points) == [5, 3, 1, 0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "family",
    [
        "decomposition",
        "sharing",
        "distillation",
        "combined",
        "combined_staged",
        "sharing_gradual",
        "quantization",
        "binarybert",
        "pruning",
        "sparsity",
        "main",
    ],
)
@pytest.mark.slow
def test_ablation_configs_run_quick(family, tmp_path, minilm_dir, glue_dir, monkeypatch):
    """Every variant's transforms (or quantization or pruning settings) apply to a tiny
    model; BinaryBERT's two stages (the first is the quantization family's TernaryBERT
    QAT) run end to end through sweep and report. Other families train as the distillation
    runs of the kill-and-resume sweep test do, and pruning as its own tests' runs (running
    each would add minutes to CI)."""
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    teacher = save_tiny_model(tmp_path / "teacher", minilm_dir, num_hidden_layers=4, num_labels=2)
    config = sweep.load_sweep(f"{REPO}/configs/ablations/sst2.py:{family},quick,teacher={teacher}")
    model = load_any(str(teacher))
    for strengths in config["variants"].values():
        for changes in strengths.values():
            if "student" not in changes:  # binarybert: its stages are fixed in the recipe
                continue
            recipe = sweep.apply_variant(config["recipe"], changes, seed=0, seeded=())
            stage = recipes.merged_stage_config(recipe, recipe["stages"][0])
            context = transform_context(stage)
            bert_config, params = transforms.from_specs(stage.transforms, context)(*model)
            if QUANTIZATION.parse(stage.quantize) is not None:
                continue
            if stage.share.groups:  # shared while training, stored once by a later stage
                assert SHARING.parse(stage.share) is not None
                assert (
                    len(recipe["stages"]) == 2
                    and "share_layers" in recipe["stages"][1]["transforms"][0]
                )
            elif stage.prune.method:  # unstructured: same shapes, zeros come in training
                assert PRUNING.parse(stage.prune) is not None
            else:
                assert artefact.count_params(params) < artefact.count_params(model[1])
    if family != "binarybert":
        return
    # End to end on a 1-layer teacher (the layer-dropping variants above need 4): a quarter
    # of the compile time of every program.
    small = save_tiny_model(tmp_path / "small", minilm_dir, num_hidden_layers=1, num_labels=2)
    config = sweep.load_sweep(f"{REPO}/configs/ablations/sst2.py:{family},quick,teacher={small}")
    technique, strengths = next(iter(config["variants"].items()))
    only = {"technique": [technique], "strength": [next(iter(strengths))]}
    summaries = sweep.run_sweep(config, tmp_path / "sweep", only=only)
    assert len(summaries) == 1
    for s in summaries:
        assert 0.0 <= s["value"] <= 1.0 and s["relative"] == s["value"] / s["reference"]["value"]
        assert s["bytes"] < s["reference"]["bytes"]  # every variant compresses
    assert sweep.finished_runs(config, tmp_path / "sweep") == json.loads(json.dumps(summaries))
    table = report.write_report([tmp_path / "sweep"], tmp_path / "report", plots=False)["table"]
    assert len(table.splitlines()) == 3 + len(summaries)


@pytest.mark.slow
def test_glue_configs_build_their_students_and_gobo_runs_on_a_regression_task(
    tmp_path, minilm_dir, glue_dir, monkeypatch
):
    """configs/ablations/glue.py: each task's students take their shapes from a tiny teacher
    (STS-B's one output included), and the no-training GOBO sweep runs and reports on STS-B."""
    monkeypatch.setenv("JAXCOMPRESS_GLUE_DIR", str(glue_dir))
    teacher = save_tiny_model(tmp_path / "teacher", minilm_dir, num_hidden_layers=4, num_labels=1)
    config = sweep.load_sweep(f"{REPO}/configs/ablations/glue.py:stsb,quick,teacher={teacher}")
    assert config["recipe"]["task"] == "stsb" and len(sweep.expand(config)) == 7
    model = load_any(str(teacher))
    for strengths in config["variants"].values():
        for changes in strengths.values():
            recipe = sweep.apply_variant(config["recipe"], changes, seed=0, seeded=())
            stage = recipes.merged_stage_config(recipe, recipe["stages"][0])
            bert_config, params = transforms.from_specs(stage.transforms, transform_context(stage))(
                *model
            )
            assert bert_config.num_labels == 1
            if QUANTIZATION.parse(stage.quantize) is None:
                assert artefact.count_params(params) < artefact.count_params(model[1])
    gobo = sweep.load_sweep(f"{REPO}/configs/ablations/glue.py:stsb,gobo,quick,teacher={teacher}")
    (summary,) = sweep.run_sweep(gobo, tmp_path / "gobo")
    assert summary["metric"] == "pearson" and summary["bytes"] < summary["reference"]["bytes"]
    assert -1.0 <= summary["value"] <= 1.0
    written = report.write_report([tmp_path / "gobo"], tmp_path / "report")["written"]
    assert [p.name for p in written] == ["report.md", "report.csv", "report_stsb.png"]
    with pytest.raises(ValueError, match="unknown task 'qqp'"):
        sweep.load_sweep(f"{REPO}/configs/ablations/glue.py:qqp,quick")
