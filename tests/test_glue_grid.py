"""benchmarks/glue_grid.py's bookkeeping on archived RTE runs: restore, keys, report rows."""

import importlib
import json
import shutil
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
glue_grid = importlib.import_module("glue_grid")

ARCHIVE = REPO / "benchmarks" / "results" / "ablation_glue_runs"


@pytest.fixture
def archive(tmp_path):
    """The committed RTE runs of seed 0, plus a second seed of heads_kd (value 0.02 lower)."""
    out = tmp_path / "archive"
    for sweep in ("rte", "rte_gobo"):
        (out / sweep).mkdir(parents=True)
        for path in (ARCHIVE / sweep).glob("*-s0-*.json"):
            shutil.copyfile(path, out / sweep / path.name)
    (heads,) = (out / "rte").glob("heads_kd-h50-s0-*.json")
    summary = json.loads(heads.read_text())
    summary |= {"seed": 1, "label": "heads_kd-h50-s1", "value": summary["value"] - 0.02}
    summary["relative"] = summary["value"] / summary["reference"]["value"]
    (out / "rte" / heads.name.replace("-s0-", "-s1-")).write_text(json.dumps(summary))
    return out


def test_restore_fills_only_missing_runs_of_each_sweep(archive, tmp_path):
    workdir = tmp_path / "runs"
    count = len(list(archive.glob("*/*.json")))
    assert glue_grid.restore(archive, workdir) == count
    assert glue_grid.restore(archive, workdir) == 0
    done = sorted(workdir.glob("*/runs/*/summary.json"))
    assert [(p.parents[2].name, p.parent.name) for p in done] == sorted(
        (p.parent.name, p.stem) for p in archive.glob("*/*.json")
    )
    assert (
        done[0].read_bytes()
        == (archive / done[0].parents[2].name / f"{done[0].parent.name}.json").read_bytes()
    )


def test_report_counts_seeds_and_claims_only_at_three(archive, tmp_path):
    workdir = tmp_path / "runs"
    glue_grid.restore(archive, workdir)
    table = glue_grid.write_grid_report(workdir, tmp_path / "grid", "a note")
    result = json.loads((tmp_path / "grid.json").read_text())
    assert result["table"] == table and result["note"] == "a note"
    rows = {r["name"]: r for r in result["rows"]}
    assert len(rows) == len(list((ARCHIVE / "rte").glob("*-s0-*.json"))) + 1
    heads = rows["heads_kd h50"]
    assert heads["seeds"] == 2 and not heads["claim"] and len(heads["values"]) == 2
    assert heads["value"] == pytest.approx(sum(heads["values"]) / 2, abs=1e-12)
    assert heads["values"][0] - heads["values"][1] == pytest.approx(0.02, abs=1e-9)
    assert heads["drop_points"] == pytest.approx(100 * (heads["reference"] - heads["value"]))
    assert rows["gobo w3"]["claim"] and rows["gobo w3"]["budget"] == {"training": "none"}
    assert rows["qat_w8a8 q8bert"]["seeds"] == 1 and not rows["qat_w8a8 q8bert"]["claim"]
    assert (
        rows["combined_kd l3_h50_f50"]["budget"]["epochs"]
        == 3 * (rows["heads_kd h50"]["budget"]["epochs"])
    )
    assert result["teachers"]["rte"]["consistent"] and result["average"]["tasks"] == ["rte"]
    assert "RTE" in table.splitlines()[0] and len(table.splitlines()) == 3 + len(rows)


def test_later_seeds_train_the_main_comparison_and_skip_gobo(monkeypatch, model_root):
    monkeypatch.setenv("JAXCOMPRESS_MODEL_ROOT", str(model_root))  # SST-2's fixed teacher
    zero, one = glue_grid.runs_at("sst2", 0), glue_grid.runs_at("sst2", 1)
    assert {name for name, _, _ in zero} == {"sst2", "sst2_gobo"}
    assert {name for name, _, _ in one} == {"sst2"}
    assert {run.seed for _, _, run in one} == {1}
    main = sorted((r.technique, r.strength) for name, _, r in zero if name == "sst2")
    assert len(main) == 7  # the eight rows but GOBO
    assert sorted((r.technique, r.strength) for _, _, r in one) == main


def test_archived_runs_keep_their_keys_in_any_checkout(monkeypatch, tmp_path):
    """The config names the teachers relative to the repository root, so a checkout
    elsewhere (here tmp_path, with stand-in teachers) computes the archived runs' keys and
    skips them."""
    monkeypatch.chdir(tmp_path)
    for task in ("cola", "mrpc", "stsb", "rte"):
        teacher = tmp_path / "runs" / "glue_teachers" / task / "jax" / "model"
        teacher.mkdir(parents=True)
        (teacher / "config.json").write_text("{}")
    monkeypatch.setenv("JAXCOMPRESS_MODEL_ROOT", str(tmp_path))  # SST-2's teacher: a name
    runs = {
        (name, run.technique, run.strength, run.seed): run
        for task in ("sst2", "cola", "mrpc", "stsb", "rte")
        for seed in (0, 1, 2)
        for name, _, run in glue_grid.runs_at(task, seed)
    }
    archived = sorted(ARCHIVE.glob("*/*.json"))
    assert len(archived) >= 48
    for path in archived:
        summary = json.loads(path.read_text())
        run = runs[path.parent.name, summary["technique"], summary["strength"], summary["seed"]]
        assert (run.dir_name, run.key) == (path.stem, summary["key"]), path.name
