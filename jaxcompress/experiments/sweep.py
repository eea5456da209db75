"""Sweeps: variants x seeds over a base recipe, each run and stage in a config-hash directory.

A sweep config (`get_config(arg)` in a Python file, as in configs/ablations/) is a dict:

- `name`: a label for the sweep.
- `recipe`: the base recipe (`task` and `stages`, as in jaxcompress/experiments/recipes.py).
- `variants`: `{technique: {strength: {stage name: changes}}}`; a finetune stage's changes
  are merged into its `config` (nested dicts merge key by key), another stage's replace its
  fields. Techniques may have different strengths.
- `seeds`: the seeds every variant runs with; `seeded` names the finetune stages that take
  the seed (default: every finetune stage the variants change).
- `measure`: the stage whose model is the run's result; `reference`: the model (id, path or
  `@stage`) it is compared with; `latency`: whether to time both (interleaved, same process).

Every stage of every run is stored under `stages/<name>-<hash>`, where the hash covers the
stage's resolved config and the hashes of the stages it reads from: a stage that no variant
or seed changes (a fine-tuned teacher) has one hash, runs once and is reused by every run. A
run's results go to `runs/<technique>-<strength>-s<seed>-<hash>/summary.json`. Finished runs
are skipped, an interrupted fine-tuning resumes from its checkpoint, and several processes
can share a sweep (`shard`), with a file lock around each stage. The lock is `flock`, which
holds across processes of one machine; hosts sharing a network filesystem whose `flock` is
unreliable should precompute shared stages first (e.g. `--only seed=0 --shard 0/1`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from flax.traverse_util import flatten_dict

from jaxcompress.config import (
    ConfigKeyError,
    ConfigValueError,
    buckets_of,
    finetune_defaults,
    run_config_file,
)
from jaxcompress.experiments import recipes
from jaxcompress.experiments.latency import paired_latency
from jaxcompress.experiments.measure import measure_model
from jaxcompress.experiments.summary import FORMAT, read_run_summary
from jaxcompress.models.artefact import write_json
from jaxcompress.train import provenance
from jaxcompress.train.inputs import load_any, load_eval_splits, load_tokenizer
from jaxcompress.train.run_dir import read_metrics

log = logging.getLogger(__name__)

SWEEP_KEYS = {"name", "recipe", "variants", "seeds", "seeded", "measure", "reference", "latency"}
REQUIRED = {"name", "recipe", "variants", "measure", "reference"}
AXES = ("technique", "strength", "seed")
_UNSET = object()
MEASURED = ("metric", "value", "eval", "params", "bytes", "bytes_no_embeddings")
MEASURED_IF_PRESENT = ("sparsity", "remaining_params")  # pruned runs
CONFIGURED = ("steps", "epochs", "examples", "batch_size")  # a finetune stage's budget


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the sweep: a variant at a seed, and the recipe it resolves to."""

    technique: str
    strength: str
    seed: int
    position: tuple[int, int]  # (technique, strength) index in the sweep config: table order
    recipe: dict
    stage_keys: dict[str, str]  # stage name -> hash of its resolved config
    key: str  # hash of the whole run

    @property
    def label(self) -> str:
        return f"{self.technique}-{self.strength}-s{self.seed}"

    @property
    def dir_name(self) -> str:
        return f"{self.label}-{self.key}"


def load_sweep(spec: str) -> dict:
    """`path/to/sweep.py[:arg]` -> the checked sweep dict its `get_config(arg)` returns."""
    _, sweep = run_config_file(spec)
    check_sweep(sweep)
    return sweep


def check_sweep(sweep: dict) -> None:
    """Unknown or missing keys, unknown stages and bad config keys raise, naming the variant."""
    if unknown := set(sweep) - SWEEP_KEYS:
        raise ConfigKeyError(f"unknown sweep key(s) {sorted(unknown)}; known: {sorted(SWEEP_KEYS)}")
    if missing := REQUIRED - set(sweep):
        raise ConfigKeyError(f"sweep config lacks {sorted(missing)}")
    recipe = sweep["recipe"]
    recipes.check_recipe(recipe)
    stages = {s["name"]: s for s in recipe["stages"]}
    if sweep["measure"] not in stages:
        raise ConfigValueError(f"measure: no stage named {sweep['measure']!r} in the recipe")
    for name in sweep.get("seeded", ()):
        if stages.get(name, {}).get("kind") != "finetune":
            raise ConfigValueError(f"seeded: {name!r} is not a finetune stage of the recipe")
    if not sweep["variants"]:
        raise ConfigValueError("a sweep needs at least one variant")
    for technique, strengths in sweep["variants"].items():
        for strength, changes in strengths.items():
            where = f"variant {technique}/{strength}"
            for name in changes:
                if name not in stages:
                    raise ConfigValueError(
                        f"{where} changes stage {name!r}, which the recipe lacks"
                    )
            try:
                varied = apply_variant(recipe, changes, seed=0, seeded=())
                recipes.check_recipe(varied)
                for stage in varied["stages"]:
                    if stage["kind"] == "finetune":
                        recipes.merged_stage_config(varied, stage)
            except (KeyError, ValueError, TypeError) as e:
                detail = e.args[0] if e.args else e  # KeyError's str() adds quotes
                raise type(e)(f"{where}: {detail}") from None


def apply_variant(recipe: dict, changes: dict, seed: int, seeded: Sequence[str]) -> dict:
    """The recipe with a variant's stage changes applied and `seed` set on `seeded` stages."""
    stages = []
    for stage in recipe["stages"]:
        stage = copy.deepcopy(stage)
        change = changes.get(stage["name"], {})
        if stage["kind"] == "finetune":
            stage["config"] = deep_merge(stage["config"], change)
            if stage["name"] in seeded:
                stage["config"]["seed"] = seed
        else:
            stage.update(copy.deepcopy(change))
        stages.append(stage)
    return {**recipe, "stages": tuple(stages)}


def deep_merge(base: dict, change: dict) -> dict:
    """`base` with `change` merged in, dicts key by key; `base` is not modified."""
    merged = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def config_hash(obj) -> str:
    """12 hex digits of the SHA-256 of `obj` as canonical JSON (tuples and lists alike)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _seeded(sweep: dict) -> tuple[str, ...]:
    if "seeded" in sweep:
        return tuple(sweep["seeded"])
    varied = {name for s in sweep["variants"].values() for c in s.values() for name in c}
    return tuple(
        s["name"]
        for s in sweep["recipe"]["stages"]
        if s["kind"] == "finetune" and s["name"] in varied
    )


def stage_keys(recipe: dict, overrides: Sequence[str] = ()) -> dict[str, str]:
    """Each stage's hash: its resolved config, with `@stage` replaced by that stage's hash."""
    keys: dict[str, str] = {}
    defaults = flatten_dict(finetune_defaults().to_dict(), sep=".")

    def ref(value):
        return f"@{keys[value[1:]]}" if isinstance(value, str) and value.startswith("@") else value

    for stage in recipe["stages"]:
        if stage["kind"] == "finetune":
            config = recipes.merged_stage_config(recipe, stage, overrides)
            config = flatten_dict(config.to_dict(), sep=".")
            config["model"] = ref(config["model"])
            config["distill.teacher"] = ref(config["distill.teacher"])
            # Only keys set away from their defaults: a key added to the defaults later
            # leaves existing hashes, and so finished runs, valid.
            resolved = {k: v for k, v in config.items() if defaults.get(k, _UNSET) != v}
        else:
            resolved = {k: ref(v) for k, v in stage.items() if k not in ("model", "models")}
            resolved["model"] = ref(stage.get("model"))
            resolved["models"] = [ref(m) for m in stage.get("models", ())]
        body = {"format": FORMAT, "task": recipe["task"], "kind": stage["kind"], **resolved}
        keys[stage["name"]] = config_hash({"name": stage["name"], "stage": body})
    return keys


def base_key(sweep: dict, overrides: Sequence[str] = ()) -> str:
    """The hash of everything a sweep's runs share: all but its variants and seeds."""
    shared = {k: v for k, v in sweep.items() if k not in ("variants", "seeds")}
    return config_hash({"format": FORMAT, "sweep": shared, "overrides": list(overrides)})


def expand(
    sweep: dict, only: dict[str, Sequence[str]] | None = None, overrides: Sequence[str] = ()
) -> list[Run]:
    """Every run of the sweep (technique x strength x seed), optionally only those whose axis
    values are listed in `only`, e.g. `{"technique": ["factorize"], "seed": ["0"]}`."""
    only = only or {}
    if unknown := set(only) - set(AXES):
        raise ConfigValueError(f"unknown sweep axis {sorted(unknown)}; axes are {list(AXES)}")
    seeded = _seeded(sweep)
    runs = []
    for t, (technique, strengths) in enumerate(sweep["variants"].items()):
        for s, (strength, changes) in enumerate(strengths.items()):
            for seed in sweep.get("seeds", (0,)):
                point = {"technique": technique, "strength": strength, "seed": str(seed)}
                if any(point[axis] not in map(str, values) for axis, values in only.items()):
                    continue
                recipe = apply_variant(sweep["recipe"], changes, seed, seeded)
                keys = stage_keys(recipe, overrides)
                key = config_hash(
                    {
                        "format": FORMAT,
                        "stages": keys,
                        "measure": sweep["measure"],
                        "reference": sweep["reference"],
                        "latency": sweep.get("latency", False),
                    }
                )
                runs.append(Run(technique, strength, seed, (t, s), recipe, keys, key))
    for axis, values in only.items():
        seen = {str(getattr(r, axis)) for r in runs}
        if missing := [v for v in values if str(v) not in seen]:
            raise ConfigValueError(f"no run has {axis} in {missing}")
    return runs


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a file), held across processes of this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def finished_runs(sweep: dict, workdir: str | Path, overrides: Sequence[str] = ()) -> list[dict]:
    """The summaries of the sweep's runs finished so far in `workdir`; trains nothing."""
    done = [
        Path(workdir) / "runs" / r.dir_name / "summary.json" for r in expand(sweep, None, overrides)
    ]
    return [read_run_summary(f) for f in done if f.exists()]


def run_sweep(
    sweep: dict,
    workdir: str | Path,
    only: dict[str, Sequence[str]] | None = None,
    shard: tuple[int, int] = (0, 1),
    overrides: Sequence[str] = (),
) -> list[dict]:
    """Runs this shard's unfinished runs in order; returns the summaries of its finished
    runs (an interrupted run ends the call: rerun to resume it)."""
    check_sweep(sweep)
    index, count = shard
    if not 0 <= index < count:
        raise ConfigValueError(f"shard {index}/{count}: need 0 <= index < count")
    workdir = Path(workdir)
    runs = expand(sweep, only, overrides)[index::count]
    base = base_key(sweep, overrides)
    summaries = []
    for i, run in enumerate(runs):
        run_dir = workdir / "runs" / run.dir_name
        done = run_dir / "summary.json"
        if done.exists():
            summaries.append(read_run_summary(done))
            continue
        log.info("run %d/%d: %s (%s)", i + 1, len(runs), run.label, run.key)
        summary = _execute(sweep, run, workdir, base, overrides)
        if summary is None:
            log.info("run %s interrupted; rerun the sweep to resume it", run.label)
            break
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(done, summary)
        summaries.append(summary)
    return summaries


def _execute(sweep: dict, run: Run, workdir: Path, base: str, overrides) -> dict | None:
    dirs = {name: workdir / "stages" / f"{name}-{key}" for name, key in run.stage_keys.items()}
    for stage in run.recipe["stages"]:
        with locked(workdir / "locks" / f"{dirs[stage['name']].name}.lock"):
            if recipes.run_stage(run.recipe, stage, dirs, overrides) is None:
                return None
    measured = _measure(sweep, run, dirs, workdir)
    relative = {name: str(path.relative_to(workdir)) for name, path in dirs.items()}
    return {
        "format": FORMAT,
        "sweep": sweep["name"],
        "base": base,
        "key": run.key,
        "label": run.label,
        "technique": run.technique,
        "strength": run.strength,
        "seed": run.seed,
        "position": list(run.position),
        "task": run.recipe["task"],
        "config": {
            "recipe": run.recipe,
            "overrides": list(overrides),
            "measure": sweep["measure"],
            "reference": sweep["reference"],
            "stage_keys": run.stage_keys,
        },
        "stages": relative,
        "training": _training(run.recipe, dirs),
        "commit": provenance.git_commit(),
        "packages": provenance.package_versions(),
        "machine": provenance.machine(),
        **measured,
    }


def _training(recipe: dict, dirs: dict[str, Path]) -> list[dict]:
    """What each finetune stage of a run trained (steps, epochs, train examples) and its dev
    metrics at each evaluation it made while training, so that a run's summary holds its
    learning curve after its stage directories are gone."""
    records = []
    for stage in recipe["stages"]:
        if stage["kind"] != "finetune":
            continue
        path = dirs[stage["name"]]
        trained = json.loads((path / recipes.SUMMARY).read_text())
        logged = [row for row in read_metrics(path) if "eval" in row]
        records.append(
            {
                "stage": stage["name"],
                **{k: trained[k] for k in ("steps", "epochs", "train_examples")},
                "configured": {k: trained["config"]["train"][k] for k in CONFIGURED},
                "dev": [{"step": r["step"], **next(iter(r["eval"].values()))} for r in logged],
            }
        )
    return records


def _copy_new(source: Path, target: Path) -> bool:
    """Copies `source` to `target` unless `target` exists; returns whether it copied."""
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return True


def archive_runs(workdir: str | Path, archive: str | Path) -> int:
    """Copies the summary of each finished run under `workdir` to `archive/<run>.json` (small
    JSON to keep with results) unless it is there already; returns how many it copied."""
    done = sorted(Path(workdir).glob("runs/*/summary.json"))
    return sum(_copy_new(d, Path(archive) / f"{d.parent.name}.json") for d in done)


def restore_runs(archive: str | Path, workdir: str | Path) -> int:
    """Puts each archived run summary (`archive_runs`) back as a finished run of `workdir`,
    where it is not there already, so that sweeping skips it and reports include it; returns
    how many it restored."""
    archived = sorted(Path(archive).glob("*.json"))
    return sum(_copy_new(p, Path(workdir) / "runs" / p.stem / "summary.json") for p in archived)


def _measure(sweep: dict, run: Run, dirs: dict[str, Path], workdir: Path) -> dict:
    """The measured stage's metrics and size (from its summary when it evaluated its model),
    relative to the reference, with paired latency if the sweep asks for it."""
    measured = next(s for s in run.recipe["stages"] if s["name"] == sweep["measure"])
    model_path = recipes.stage_model(dirs[sweep["measure"]])
    stage_summary = dirs[sweep["measure"]] / recipes.SUMMARY
    row = json.loads(stage_summary.read_text()) if stage_summary.exists() else {}
    if "eval" not in row:  # e.g. an export stage: evaluate what it wrote
        row = _evaluate(run.recipe, measured, model_path)
    row = {k: row[k] for k in MEASURED} | {k: row[k] for k in MEASURED_IF_PRESENT if k in row}
    reference_path = recipes.resolve(sweep["reference"], dirs)
    row["reference"] = _reference(sweep["reference"], reference_path, run, measured, workdir)
    row["relative"] = row["value"] / row["reference"]["value"]
    if sweep.get("latency", False):
        model, reference = load_any(model_path), load_any(reference_path)
        row.update(paired_latency(reference, model))
    return row


def _eval_settings(recipe: dict, measured: dict) -> dict:
    """The measured stage's evaluation settings when it is a finetune stage (else none: the
    defaults): its length, padding buckets, eval batch size and dev slice."""
    if measured["kind"] != "finetune":
        return {}
    stage = recipes.merged_stage_config(recipe, measured)
    return {
        "max_length": stage.max_length,
        "buckets": buckets_of(stage),
        "eval": {"batch_size": stage.eval.batch_size, "examples": stage.eval.examples},
    }


def _evaluate(recipe: dict, measured: dict, path: str) -> dict:
    """Dev metrics and size of the model at `path`, evaluated as the measured stage is."""
    config = recipes.task_config(recipe["task"], path)
    with config.unlocked():
        config.update(_eval_settings(recipe, measured))
    dev = load_eval_splits(config, load_tokenizer(config))
    return measure_model(config, *load_any(path), dev)


def _reference(name: str, path: str, run: Run, measured: dict, workdir: Path) -> dict:
    """The reference model's metrics and size, measured once per sweep and task."""
    task = run.recipe["task"]
    source = f"@{run.stage_keys[name[1:]]}" if name.startswith("@") else name
    settings = _eval_settings(run.recipe, measured)
    cache = workdir / "references" / f"{task}-{config_hash([task, source, settings])}.json"
    with locked(cache.with_suffix(".lock")):
        if cache.exists():
            return json.loads(cache.read_text())
        row = {"model": name, **_evaluate(run.recipe, measured, path)}
        write_json(cache, row)
        return row
