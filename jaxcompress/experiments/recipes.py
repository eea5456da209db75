"""Compression pipelines as data: ordered, resumable stages that end in a results table.

A recipe config has a `task` and a tuple of `stages`, each a dict with a `name`, a `kind`
and the kind's fields:

- `finetune`: `config` (a partial fine-tuning config, as in configs/finetune.py). Covers
  fine-tuning a teacher, building a student by `transforms` and distilling into it.
- `transform`: `model` and `transforms`; applies them and saves the model (no training).
- `evaluate`: `models` (a tuple); measures each on the dev set, with latency if `latency`.
- `quantize`: `model` and `quantize` (a partial `quantize` config section, as in
  configs/finetune.py); post-training quantization without training: activation ranges
  are calibrated on train batches, the packed artefact goes to `workdir/<name>/quantized`,
  the dequantized weights to `workdir/<name>/model`, and the dev metrics to its summary.
- `gobo`: `model`, `kernels` and `embeddings` (bits, 0 = float); GOBO's post-training
  quantization (float outliers, the rest clustered to 2^bits centroids), no data needed; the
  packed artefact goes to `workdir/<name>/gobo.safetensors`, the dequantized weights to
  `workdir/<name>/model`.
- `export`: `model`; writes it as a Hugging Face directory (the dense equivalent of any
  compressed shape) to `workdir/<name>/model`.

Wherever a model is named (`config.model`, `config.distill.teacher`, `model`, `models`),
`@stage` means the model an earlier stage wrote, so stages chain: teacher -> assistant ->
student, or TinyBERT's intermediate-layer stage -> prediction-layer stage. Each stage writes
`workdir/<name>/summary.json` when done; a rerun skips finished stages and resumes a
`finetune` stage from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from jaxcompress import core
from jaxcompress.compress import transforms
from jaxcompress.compress.quant import gobo
from jaxcompress.compress.quant.method import QUANTIZATION
from jaxcompress.config import (
    ConfigKeyError,
    ConfigValueError,
    apply_overrides,
    finetune_defaults,
    merge,
    run_config_file,
    validate,
)
from jaxcompress.data import glue as data
from jaxcompress.data import metrics
from jaxcompress.errors import UserError
from jaxcompress.experiments.measure import measure_model
from jaxcompress.experiments.results import markdown_table
from jaxcompress.models import artefact, bert_rules
from jaxcompress.models.bert import Bert
from jaxcompress.models.hf import resolve_model_dir, save_pretrained
from jaxcompress.train import loop as train
from jaxcompress.train.evaluate import evaluate_splits, make_eval_step
from jaxcompress.train.inputs import (
    get_num_outputs,
    load_any,
    load_eval_splits,
    load_task_splits,
    load_tokenizer,
    transform_context,
)
from jaxcompress.train.progress import duration

log = logging.getLogger(__name__)

STAGE_FIELDS = {
    "finetune": {"name", "kind", "config"},
    "transform": {"name", "kind", "model", "transforms"},
    "evaluate": {"name", "kind", "models", "latency"},
    "export": {"name", "kind", "model"},
    "quantize": {"name", "kind", "model", "quantize"},
    "gobo": {"name", "kind", "model", "kernels", "embeddings"},
}
SUMMARY = "summary.json"


def load_recipe(spec: str) -> dict:
    """`path/to/recipe.py[:arg]` -> the recipe dict its `get_config(arg)` returns, checked."""
    _, recipe = run_config_file(spec)
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: dict) -> None:
    """Unknown keys, kinds, duplicate names and forward `@` references raise, naming the stage."""
    if set(recipe) - {"task", "stages"} or "stages" not in recipe:
        raise ConfigKeyError(f"a recipe has 'task' and 'stages'; got {sorted(recipe)}")
    seen: set[str] = set()
    for i, stage in enumerate(recipe["stages"]):
        name = stage.get("name") or f"#{i}"
        kind = stage.get("kind")
        if kind not in STAGE_FIELDS:
            raise ConfigValueError(f"stage {name}: kind {kind!r} not in {sorted(STAGE_FIELDS)}")
        if unknown := set(stage) - STAGE_FIELDS[kind]:
            raise ConfigKeyError(f"stage {name}: unknown keys {sorted(unknown)} for a {kind} stage")
        if name in seen:
            raise ConfigValueError(f"two stages are named {name!r}")
        for ref in _references(stage):
            if ref not in seen:
                raise ConfigValueError(f"stage {name} uses @{ref}, which is not an earlier stage")
        seen.add(name)


def _references(stage: dict) -> list[str]:
    names = [stage.get("model", "")] + list(stage.get("models", ()))
    config = stage.get("config", {})
    names += [config.get("model", ""), config.get("distill", {}).get("teacher", "")]
    return [n[1:] for n in names if isinstance(n, str) and n.startswith("@")]


def stage_model(stage_dir: Path) -> str:
    """The model a finished stage wrote: its native artefact if it has one, else HF format."""
    for sub in ("compressed", "model"):
        if (stage_dir / sub).exists():
            return str(stage_dir / sub)
    raise FileNotFoundError(f"stage {stage_dir.name} has written no model under {stage_dir}")


def resolve(value: str, dirs: dict[str, Path]) -> str:
    """A model name with `@stage` replaced by the model that stage wrote."""
    return stage_model(dirs[value[1:]]) if value.startswith("@") else value


def stage_config(
    recipe: dict, stage: dict, dirs: dict[str, Path], overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """The full fine-tuning config of a `finetune` stage, `@` references resolved."""
    config = merged_stage_config(recipe, stage, overrides)
    with config.unlocked():
        config.model = resolve(config.model, dirs)
        config.distill.teacher = resolve(config.distill.teacher, dirs)
        if not config.tokenizer:  # a stage's output holds the tokenizer of its source
            config.tokenizer = config.model
    return config


def merged_stage_config(
    recipe: dict, stage: dict, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """A `finetune` stage's config over the defaults, `@` references left as written; bad
    values raise UserError naming the stage."""
    partial = ml_collections.ConfigDict({"task": recipe.get("task", "sst2"), **stage["config"]})
    config = merge(finetune_defaults(), partial)
    apply_overrides(config, overrides)
    try:
        validate(config)
    except UserError as e:
        raise UserError(f"stage {stage['name']}: {e}") from None
    return config


def run_finetune(recipe, stage, dirs, overrides) -> dict:
    config = stage_config(recipe, stage, dirs, overrides)
    summary = train.train(config, dirs[stage["name"]])
    if "stopped_at" in summary:
        return summary
    return {
        "source": stage["config"].get("model", config.model),  # as written: "@stage" or id
        "teacher": config.distill.teacher or None,
        "steps": summary["steps"],
        "train_examples": summary["train_examples"],
        **{k: summary[k] for k in ("metric", "value", "params", "bytes", "bytes_no_embeddings")},
        **({"wall_seconds": summary["wall_seconds"]} if "wall_seconds" in summary else {}),
    }


def task_config(task: str, model: str) -> ml_collections.ConfigDict:
    """The default config of `task` evaluating `model` (with its own tokenizer)."""
    config = merge(finetune_defaults(), ml_collections.ConfigDict({"task": task}))
    with config.unlocked():
        config.model = config.tokenizer = model
    return config


def run_transform(recipe, stage, dirs, overrides) -> dict:
    source = resolve(stage["model"], dirs)
    config = task_config(recipe["task"], source)
    bert_config, params = load_any(source, num_labels=get_num_outputs(recipe["task"]))
    context = transform_context(config)
    bert_config, params = transforms.from_specs(stage["transforms"], context)(bert_config, params)
    out = artefact.save(
        bert_config, params, dirs[stage["name"]] / "compressed", resolve_model_dir(source)
    )
    tokenizer = load_tokenizer(config)
    dev = load_eval_splits(config, tokenizer)
    row = measure_model(config, bert_config, params, dev)
    return {"source": stage["model"], **row, "saved": str(out)}


def run_evaluate(recipe, stage, dirs, overrides) -> dict:
    rows = []
    for name in stage["models"]:
        path = resolve(name, dirs)
        config = task_config(recipe["task"], path)
        bert_config, params = load_any(path)
        dev = load_eval_splits(config, load_tokenizer(config))
        row = measure_model(config, bert_config, params, dev, stage.get("latency", False))
        rows.append({"model": name, **row})
    reference = rows[-1]  # the last listed model (usually the teacher) is the reference
    for row in rows:
        row["relative"] = row["value"] / reference["value"]
        row["params_relative"] = row["params"] / reference["params"]
        if "latency_s" in row:
            row["speedup"] = reference["latency_s"] / row["latency_s"]
    return {"rows": rows}


def run_quantize(recipe, stage, dirs, overrides) -> dict:
    source = resolve(stage["model"], dirs)
    config = task_config(recipe["task"], source)
    with config.unlocked():
        config.quantize = merge(config.quantize, ml_collections.ConfigDict(stage["quantize"]))
        # calibration reads only the first batches of a seeded shuffle of this subset
        config.train.examples = config.quantize.calibration_batches * config.train.batch_size
    try:
        validate(config)
    except UserError as e:
        raise UserError(f"stage {stage['name']}: {e}") from None
    tokenizer = load_tokenizer(config)
    train_split, dev = load_task_splits(config, tokenizer)
    bert_config, params = load_any(source, num_labels=get_num_outputs(config.task))
    spec = QUANTIZATION.parse(config.quantize)
    if spec is None:
        raise ConfigValueError(f"stage {stage['name']}: its quantize section quantizes nothing")
    setup = train.run_setup(config, bert_config, total_steps=1, train_split=train_split)
    plan = QUANTIZATION.plan(spec, params, setup)
    state = plan.reparam.init(params)
    seen = core.export(plan.reparam, params, state)  # what the model computes with
    model = plan.model(Bert(bert_config))
    results = evaluate_splits(config, make_eval_step(model), seen, dev)
    out = dirs[stage["name"]]
    tokenizer_dir = resolve_model_dir(source)
    size = plan.export(params, state, out)
    labels = data.get_task(config.task).label_names
    save_pretrained(
        bert_config, seen, out / "model", tokenizer_dir=tokenizer_dir, label_names=labels
    )
    metric = metrics.main_metric(config.task)
    return {
        "source": stage["model"],
        "metric": metric,
        "value": results[next(iter(results))][metric],
        "eval": results,
        "params": artefact.count_params(seen),
        **size,
    }


def run_gobo(recipe, stage, dirs, overrides) -> dict:
    source = resolve(stage["model"], dirs)
    config = task_config(recipe["task"], source)

    def spec(bits: int) -> gobo.GoboSpec | None:
        return gobo.GoboSpec(bits=bits) if bits else None

    rules = bert_rules.weight_rules(spec(stage.get("kernels", 3)), spec(stage.get("embeddings", 0)))
    bert_config, params = load_any(source, num_labels=get_num_outputs(config.task))
    dequantized, tensors = gobo.gobo(params, rules)
    out = dirs[stage["name"]]
    gobo.gobo_save(out / "gobo.safetensors", params, tensors)
    save_pretrained(
        bert_config,
        dequantized,
        out / "model",
        tokenizer_dir=resolve_model_dir(source),
        label_names=data.get_task(config.task).label_names,
    )
    dev = load_eval_splits(config, load_tokenizer(config))
    row = measure_model(config, bert_config, dequantized, dev)
    return {"source": stage["model"], **row, **gobo.gobo_packed_bytes(params, tensors)}


def run_export(recipe, stage, dirs, overrides) -> dict:
    source = resolve(stage["model"], dirs)
    bert_config, params = load_any(source)
    out = save_pretrained(
        bert_config,
        params,
        dirs[stage["name"]] / "model",
        tokenizer_dir=resolve_model_dir(source),
        label_names=data.get_task(recipe.get("task", "sst2")).label_names,
    )
    return {"source": stage["model"], "exported": str(out)}


RUNNERS: dict[str, Callable[[dict, dict, dict[str, Path], Sequence[str]], dict]] = {
    "finetune": run_finetune,
    "transform": run_transform,
    "evaluate": run_evaluate,
    "export": run_export,
    "quantize": run_quantize,
    "gobo": run_gobo,
}


def run_stage(
    recipe: dict, stage: dict, dirs: dict[str, Path], overrides: Sequence[str] = ()
) -> dict | None:
    """Runs one stage into `dirs[name]` (or reuses its finished output); returns its summary,
    or None if it was interrupted."""
    done = dirs[stage["name"]] / SUMMARY
    if done.exists() and stage["kind"] != "finetune":
        log.info("stage %s: done earlier", stage["name"])
        return json.loads(done.read_text())
    log.info("stage %s (%s)", stage["name"], stage["kind"])
    started = time.perf_counter()
    summary = RUNNERS[stage["kind"]](recipe, stage, dirs, overrides)
    if "stopped_at" in summary:
        return None
    seconds = {"wall_seconds": time.perf_counter() - started}
    summary = {"stage": stage["name"], "kind": stage["kind"], **seconds, **summary}
    if stage["kind"] != "finetune":  # train() writes a finetune stage's own summary
        done.parent.mkdir(parents=True, exist_ok=True)
        artefact.write_json(done, summary)
    return summary


def run_recipe(recipe: dict, workdir: str | Path, overrides: Sequence[str] = ()) -> list[dict]:
    """Runs every unfinished stage in order, each in `workdir/<stage name>`; returns each
    stage's summary (stopping early if a stage was interrupted). `overrides` apply to every
    finetune stage, e.g. `train.steps=50`."""
    check_recipe(recipe)
    for stage in recipe["stages"]:  # every stage's values, before the first stage runs
        if stage["kind"] == "finetune":
            merged_stage_config(recipe, stage, overrides)
    dirs = {stage["name"]: Path(workdir) / stage["name"] for stage in recipe["stages"]}
    summaries = []
    for stage in recipe["stages"]:
        summary = run_stage(recipe, stage, dirs, overrides)
        if summary is None:
            break
        summaries.append(summary)
    return summaries


def results_table(summaries: list[dict]) -> str:
    """A markdown table of every stage's model: metric, size, and latency where measured,
    then `total time: ...` (the stages' `wall_seconds` summed) when the summaries have them.

    A stage whose model a later `evaluate` stage measures (`@stage` in its models) gets no
    row of its own: the evaluate row has the same numbers and more."""
    columns = ["stage", "model", "metric", "value", "relative", "params", "MB", "speedup"]
    evaluated = {
        row["model"][1:]
        for summary in summaries
        for row in summary.get("rows", [])
        if str(row.get("model", "")).startswith("@")
    }
    cells = []
    for summary in summaries:
        if "rows" not in summary and summary["stage"] in evaluated:
            continue
        for row in summary.get("rows", [summary]):
            cells.append(
                {
                    "stage": summary["stage"],
                    "model": Path(row["model"]).name
                    if "model" in row
                    else f"from {Path(str(row.get('source'))).name}",
                    "metric": row.get("metric", ""),
                    "value": _fmt(row.get("value")),
                    "relative": _fmt(row.get("relative")),
                    "params": f"{row['params'] / 1e6:.2f}M" if "params" in row else "",
                    "MB": f"{row['bytes'] / 1e6:.1f}" if "bytes" in row else "",
                    "speedup": f"{row['speedup']:.2f}x" if "speedup" in row else "",
                }
            )
    table = markdown_table(cells, columns)
    seconds = [s["wall_seconds"] for s in summaries if "wall_seconds" in s]
    if seconds:
        table += f"\n\ntotal time: {duration(sum(seconds))}"
    return table


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"
