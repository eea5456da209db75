"""The one readable train loop: a config in, a trained, evaluated and exported run out."""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training.dynamic_scale import DynamicScale
from jax.sharding import Mesh
from tqdm import tqdm

from jaxcompress import core
from jaxcompress.compress import transforms
from jaxcompress.compress.distill.objective import (
    DISTILL_PARAMS,
    EXITS,
    Batch,
    Objective,
    forward,
    init_distill_params,
    make_loss,
    model_params,
    task_loss,
)
from jaxcompress.compress.dynamic import early_exit
from jaxcompress.compress.method import Plan, Setup, TrainingMethod
from jaxcompress.compress.registry import NOT_WEIGHTS, TRAINING_METHODS
from jaxcompress.config import buckets_of, validate, with_device_defaults
from jaxcompress.data import glue as data
from jaxcompress.data import metrics
from jaxcompress.models import artefact
from jaxcompress.models.bert import Bert, BertConfig, Linear
from jaxcompress.models.hf import resolve_model_dir, save_pretrained
from jaxcompress.train import checkpoint, precompile, progress, sharding
from jaxcompress.train.evaluate import evaluate_splits, make_eval_step, predict
from jaxcompress.train.inputs import (
    load_any,
    load_model,
    load_task_splits,
    load_teacher,
    load_tokenizer,
    load_train_split,
    total_steps,
    transform_context,
)
from jaxcompress.train.run_dir import RunDir
from jaxcompress.train.step import TrainState, make_optimizer, make_train_step, new_rng

log = logging.getLogger(__name__)


def run_setup(
    config: ml_collections.ConfigDict,
    bert_config: BertConfig,
    total_steps: int,
    train_split: data.TokenizedSplit | None = None,
) -> Setup:
    """What this run offers its training-time methods (`compress.method.Setup`): the first
    train batches of epoch 0 (the split loaded on first use if not given), the float BERT's
    forward and task loss without dropout, BERT's dense layer class, and saved models."""
    model = Bert(bert_config)

    @functools.cache
    def split() -> data.TokenizedSplit:
        return (
            train_split
            if train_split is not None
            else load_train_split(config, load_tokenizer(config))
        )

    def batches(n: int) -> list[Batch]:
        order = data.epoch_batches(
            split().lengths, config.train.batch_size, config.seed, 0, config.train.sort_window
        )
        return [data.make_batch(split(), indices, buckets_of(config)) for indices in order[:n]]

    def apply_fn(params, batch):
        args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return model.apply({"params": params}, *args).logits

    def loss_fn(params, batch):
        logits = forward(model, params, batch, None).logits
        return task_loss(logits, batch["labels"], batch["example_mask"])

    return Setup(
        total_steps=total_steps,
        seed=config.seed,
        batches=batches,
        apply_fn=apply_fn,
        loss_fn=loss_fn,
        layer_types=(Linear,),
        load_params=saved_params,
    )


def saved_params(path: str) -> dict:
    """A saved model's params (jaxcompress or Hugging Face directory, or hub id)."""
    return load_any(path)[1]


class Sections(NamedTuple):
    """A run config's sections, each parsed once, at the boundary, into what the run uses.

    Attributes:
      transform: the composed structure transforms of `transforms`.
      objective: the loss terms of `distill`.
      exits: the `early_exit` spec, None without exits.
      methods: the training-time methods whose section asks for them, with their specs, in
        registry order.
    """

    transform: core.StructureTransform
    objective: Objective
    exits: early_exit.ExitSpec | None
    methods: tuple[tuple[TrainingMethod, Any], ...]


def parse_sections(config: ml_collections.ConfigDict) -> Sections:
    """Every section of a run config parsed (bad values raise ValueError; nothing is read)."""
    methods = ((m, m.parse(config[m.section])) for m in TRAINING_METHODS)
    return Sections(
        transform=transforms.from_specs(config.transforms, transform_context(config)),
        objective=Objective.from_config(config.distill),
        exits=early_exit.ExitSpec.from_config(config.early_exit),
        methods=tuple((m, spec) for m, spec in methods if spec is not None),
    )


def initial_state(
    config: ml_collections.ConfigDict,
    total_steps: int,
    teacher_config: BertConfig | None = None,
    mesh: Mesh | None = None,
    train_split: data.TokenizedSplit | None = None,
    sections: Sections | None = None,
) -> tuple[BertConfig, Any, optax.GradientTransformation, TrainState, tuple[Plan, ...]]:
    """The model, optimizer, step-0 train state and training-time methods of a config.

    Every method of `compress.registry.TRAINING_METHODS` whose config section asks for it
    adds its trainable extras, then plans its part of the run on the step-0 params (as its
    reparam receives them); their reparams, chained in registry order on the model's part of
    the trainable tree, live in the optimizer state (`core.with_reparam`), and the returned
    model is the one their model hooks wrap. With a teacher, the trainable tree also holds
    the objective's projections (if any). The state is placed on `mesh` (default:
    `config.mesh`) by `sharding`'s rules: parameters put there once loaded, optimizer state
    created there. `train_split` (loaded on first use if None) feeds calibration;
    `sections` are the config's parsed sections (parsed here if None).
    """
    mesh = sharding.mesh_from_config(config.mesh) if mesh is None else mesh
    sections = parse_sections(config) if sections is None else sections
    bert_config, params = load_model(config, sections.transform)
    methods = sections.methods
    for method, spec in methods:
        params = method.prepare(spec, params, saved_params)
    if teacher_config is not None:
        projections = init_distill_params(sections.objective, bert_config, teacher_config)
        if projections:
            params = {**params, DISTILL_PARAMS: projections}
    exits = sections.exits
    if exits is not None:
        params = {**params, EXITS: early_exit.init_exits(bert_config, params, exits.layers)}
    rates = {k: v for method, spec in methods for k, v in method.extra_rates(spec).items()}
    tx = make_optimizer(config.train, total_steps, NOT_WEIGHTS, rates)
    if exits is not None and exits.freeze_backbone:
        tx = early_exit.frozen_backbone_optimizer(tx)
    params, specs = sharding.place_params(bert_config, params, mesh)
    sharding.check_fsdp(params, mesh)
    setup = run_setup(config, bert_config, total_steps, train_split)
    plans: list[Plan] = []
    seen = model_params(params)
    for i, (method, spec) in enumerate(methods):
        plans.append(method.plan(spec, seen, setup))
        if i + 1 < len(methods):  # the next method plans on what this one's reparam gives
            reparam = plans[-1].reparam
            seen = reparam.apply(seen, reparam.init(seen))
    reparam = core.skipping(core.chain(*(p.reparam for p in plans)), (DISTILL_PARAMS, EXITS))
    tx = core.with_reparam(reparam, tx)
    opt_specs = sharding.state_specs(jax.eval_shape(tx.init, params), params, specs)
    opt_state = jax.jit(tx.init, out_shardings=sharding.named(mesh, opt_specs))(params)
    scalars = (
        jnp.array(0, jnp.int32),
        new_rng(config.seed, config.rng_impl),
        DynamicScale() if config.dtype == "float16" else (),
    )
    step, rng, loss_scale = jax.device_put(scalars, sharding.replicated(mesh))
    state = TrainState(step, params, opt_state, rng, loss_scale)
    model = Bert(bert_config)
    for plan in plans:
        model = plan.model(model)
    return bert_config, model, tx, state, tuple(plans)


def seen_params(state: TrainState) -> dict:
    """The model's parameters as the forward pass sees them (pruned weights zero, quantized
    weights as their codes' values)."""
    return model_params(core.reparam_apply(state.params, state.opt_state))


def exported_params(state: TrainState) -> dict:
    """The model's parameters to export: every method's `finalize`, extras removed."""
    return model_params(core.finalize(state.params, state.opt_state))


def train(
    config: ml_collections.ConfigDict, workdir: str | Path, *, stop_after_step: int | None = None
) -> dict:
    """Fine-tune `config.model` on `config.task`; resumes from `workdir` if it holds a checkpoint.

    `stop_after_step` ends the run early (after checkpointing), as a preemption would.
    Returns the summary that is also written to `workdir/summary.json`; a finished run in
    `workdir` (same results-relevant config) is not rerun: its saved summary is returned.
    Bad config values raise `UserError` before anything is read or written.
    """
    started = time.perf_counter()
    validate(config)
    config = with_device_defaults(config)  # resolved before anything is saved
    sections = parse_sections(config)
    finished = finished_summary(config, workdir)
    if finished is not None:
        return finished
    if config.distributed:
        sharding.initialize_distributed()
    enable_compile_cache(config.compile_cache)
    mesh = sharding.mesh_from_config(config.mesh)
    check_batch_split(config, mesh)
    return _train(config, sections, workdir, mesh, stop_after_step, started)


def finished_summary(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """The saved summary of a finished run in `workdir`, None if it has none; a finished run
    with a config that changes results is refused (`RunDir`)."""
    summary_file = Path(workdir) / "summary.json"
    if not summary_file.exists():
        return None
    RunDir(workdir, config, write=False)  # raises if the finished run had a different config
    log.info("%s holds a finished run; its summary is reused (a new workdir trains again)", workdir)
    return json.loads(summary_file.read_text())


def check_batch_split(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Train micro-batches and eval batches must split evenly over the mesh's data axes."""
    accumulate = config.train.grad_accum
    if accumulate < 1 or config.train.batch_size % accumulate:
        raise ValueError(
            f"train.grad_accum={accumulate} must divide train.batch_size={config.train.batch_size}"
        )
    sharding.check_batch_size(config.train.batch_size // accumulate, mesh, "train micro-batch")
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")


def _train(
    config: ml_collections.ConfigDict,
    sections: Sections,
    workdir: str | Path,
    mesh: Mesh,
    stop_after_step,
    started: float,
) -> dict:
    main = jax.process_index() == 0
    if not main:  # one log for the whole pod: process 0's
        logging.getLogger("jaxcompress").setLevel(logging.WARNING)
    tokenizer = load_tokenizer(config)
    train_split, eval_splits = load_task_splits(config, tokenizer)
    steps = total_steps(config, len(train_split))
    steps_per_epoch = len(train_split) // config.train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_split)} train examples < batch size {config.train.batch_size}"
        )
    teacher, teacher_params = load_teacher(config)
    if teacher is not None:
        teacher_params, _ = sharding.place_params(teacher.config, teacher_params, mesh)
    bert_config, model, tx, state, plans = initial_state(
        config, steps, None if teacher is None else teacher.config, mesh, train_split, sections
    )
    objective, exits = sections.objective, sections.exits
    if config.token_keep and objective.uses_layers:
        raise ValueError(
            "token_keep shortens hidden states; layer distillation terms need them whole"
        )
    if exits is not None:
        loss_fn = early_exit.make_exit_loss(model, exits, teacher)
    else:
        loss_fn = make_loss(model, objective, teacher)
    teacher_logits = None
    if teacher is not None and config.distill.cache_logits:
        if objective.uses_layers:
            raise ValueError(
                "distill.cache_logits caches logits only; layer terms need the teacher"
            )
        teacher_logits = predict(
            make_eval_step(teacher, mesh),
            teacher_params,
            train_split,
            config.eval.batch_size,
            config.buckets,
        )
    # Only once inputs load: a bad model or data path writes nothing. Process 0 writes.
    run = RunDir(workdir, config, write=main)
    mngr = checkpoint.manager(run.path / "checkpoints", config.checkpoint_keep)
    restored = checkpoint.restore_latest(mngr, state)
    if restored is not None:
        state = restored
        log.info("resumed from step %d", int(state.step))
    # Rows logged after the restored step are from the lost part of an earlier attempt.
    run.drop_rows_after(int(state.step), final_eval=int(state.step) >= steps)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    jitted_step = make_train_step(
        loss_fn,
        tx,
        config.rng_impl,
        plans,
        config.train.grad_accum,
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )
    train_step = sharding.within(mesh, jitted_step)
    eval_compiles = progress.CompileAnnouncer(log, "eval step")
    eval_step = make_eval_step(model, mesh, eval_compiles)

    def evaluate_all(params) -> dict[str, dict[str, float]]:
        return evaluate_splits(config, eval_step, params, eval_splits)

    start = int(state.step)
    last = steps if stop_after_step is None else min(steps, stop_after_step)
    unchecked: list[dict] = []  # step metrics since the last finiteness check
    window: list[dict] = []  # step metrics since the last log line
    real_tokens = padded_tokens = window_tokens = 0
    t0 = window_t = time.perf_counter()
    announce = progress.CompileAnnouncer(log, "train step")

    def epoch_order(epoch: int) -> list[np.ndarray]:
        lengths, size = train_split.lengths, config.train.batch_size
        return data.epoch_batches(lengths, size, config.seed, epoch, config.train.sort_window)

    def host_batch(indices: np.ndarray) -> Batch:
        batch = data.make_batch(
            train_split,
            indices,
            config.buckets,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        if teacher_logits is not None:
            rows = len(batch["labels"])
            batch["teacher_logits"] = teacher_logits[indices[jax.process_index() * rows :][:rows]]
        return batch

    programs: dict[int, Any] = {}  # padded length -> compiled train step
    ahead_seconds = 0.0
    if config.precompile == "on" and last > start:
        t_compile = time.perf_counter()
        epoch, position = divmod(start, steps_per_epoch)
        template = sharding.local_batch_to_global(host_batch(epoch_order(epoch)[position]), mesh)
        lengths = precompile.padded_lengths(
            train_split.lengths,
            config.train.batch_size,
            config.seed,
            config.train.sort_window,
            config.buckets,
            range(start, last),
        )
        jobs = {
            ("train", n): (
                jitted_step.lower,
                (state, precompile.batch_like(template, n), teacher_params),
            )
            for n in lengths
        }
        eval_params = seen_params(state)
        size = config.eval.batch_size
        for split in eval_splits.values():
            first = next(data.eval_batches(split, size, config.buckets))
            first.pop("index")
            first = eval_step.placed(first)
            for n in precompile.eval_lengths(split.lengths, size, config.buckets):
                like = precompile.batch_like(first, n)
                jobs.setdefault(("eval", n), (eval_step.lower, (eval_params, like)))
        compiled = precompile.compile_programs(mesh, jobs)
        del eval_params
        programs = {n: c for (kind, n), c in compiled.items() if kind == "train"}
        eval_step.programs.update(
            {(size, n): c for (kind, n), c in compiled.items() if kind == "eval"}
        )
        announce.seen.update((config.train.batch_size, n) for n in programs)
        ahead_seconds = time.perf_counter() - t_compile
    progress_t, progress_step, progress_tokens = t0, start, 0  # the last time-based log line
    order: tuple[int, list[np.ndarray]] = (-1, [])
    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"finetune {config.task}",
        unit="step",
        disable=None if main else True,
    )
    for step in range(start, last):
        epoch, position = divmod(step, steps_per_epoch)
        if order[0] != epoch:
            order = (epoch, epoch_order(epoch))
        batch = host_batch(order[1][position])
        n_real = int(batch["attention_mask"].sum()) * jax.process_count()  # about: this host's
        real_tokens, window_tokens = real_tokens + n_real, window_tokens + n_real
        progress_tokens += n_real
        padded_tokens += batch["input_ids"].size * jax.process_count()
        shape = (config.train.batch_size, batch["input_ids"].shape[1])
        batch = sharding.local_batch_to_global(batch, mesh)
        compiling = shape not in announce.seen
        program = programs.get(shape[1], train_step)
        state, step_metrics = announce(shape, program, state, batch, teacher_params)
        if unchecked:  # at most one step ahead of the device, so rates and lines are on time
            jax.block_until_ready(unchecked[-1])
        unchecked.append(step_metrics)
        done = step + 1
        bar.update(1)
        if compiling:  # rates and the pace (time left) count from after compilation
            progress_t, progress_step, progress_tokens = time.perf_counter(), done, 0
            window_t, window_tokens = progress_t, 0
        since_line = time.perf_counter() - progress_t
        each = since_line / max(done - progress_step, 1)  # seconds a step takes
        # two steps: the line waits for the step just dispatched, and the next may not come
        if bar.disable and main and progress.due(since_line, 2 * each):
            since = (progress_t, progress_step, progress_tokens)
            progress_t, progress_step = log_progress(step_metrics, done, last, steps, since)
            progress_tokens = 0
        if done % config.log_every == 0 or done == last:
            window += check_finite(unchecked, done, mngr)
            unchecked = []
            now = time.perf_counter()
            # None when every step of the window compiled a new shape
            rate = window_tokens / (now - window_t) if window_tokens else None
            loss = float(np.mean([m["loss"] for m in window]))
            # the window's mean of every other term the step reports (distillation terms,
            # penalties, the methods' schedules), so a run's metrics say what its loss is made of
            terms = {
                k: float(np.mean([m[k] for m in window]))
                for k in window[-1]
                if k not in ("loss", "grad_norm", "finite")
            }
            run.log(
                step=done,
                loss=loss,
                grad_norm=window[-1]["grad_norm"],
                tokens_per_s=rate,
                **terms,
            )
            shown = "-" if rate is None else f"{rate:.0f}"
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=shown)
            if bar.disable and main:  # no terminal: progress goes to the log instead
                log.info("step %d/%d loss %.4f %s tokens/s", done, steps, loss, shown)
            window, window_t, window_tokens = [], now, 0
        if config.eval.every_steps > 0 and done % config.eval.every_steps == 0 and done < steps:
            run.log(step=done, eval=evaluate_all(seen_params(state)))
        if done % config.checkpoint_every == 0 or done == last:
            window += check_finite(unchecked, done, mngr)
            unchecked = []
            checkpoint.save(mngr, done, state)
    bar.close()
    train_seconds = time.perf_counter() - t0
    if last > start:
        log.info("trained steps %d-%d in %s", start + 1, last, progress.duration(train_seconds))
    if int(state.step) < steps:
        log.info(
            "stopped at step %d of %d; rerun the same command to resume", int(state.step), steps
        )
        return {"stopped_at": int(state.step), "steps": steps}

    results = evaluate_all(seen_params(state))
    run.log(step=steps, eval=results)
    metric = metrics.main_metric(config.task)
    value = results[data.get_task(config.task).eval_splits[0]][metric]
    if not main:  # process 0 writes the artefacts and the summary
        return {"task": config.task, "metric": metric, "value": value, "eval": results}
    # Each method writes its artefact from the params its reparam receives, which it then
    # finalizes for the next; a later method's figures (a packed quantized file after a
    # sparse one) replace an earlier one's. The result is `exported_params(state)`.
    method_states = sharding.to_host(core.reparam_state(state.opt_state).state)
    params = sharding.to_host(model_params(state.params))
    exported = {}
    for plan, method_state in zip(plans, method_states, strict=True):
        if plan.export is not None:
            exported |= plan.export(params, method_state, run.path)
        params = (plan.reparam.finalize or plan.reparam.apply)(params, method_state)
    params = sharding.to_host(core.strip_extra_leaves(params))
    figures = {**artefact.saved_bytes(params), **exported}
    tokenizer_dir = resolve_model_dir(config.tokenizer or config.model)
    labels = data.get_task(config.task).label_names
    model_dir = save_pretrained(
        bert_config, params, run.path / "model", tokenizer_dir=tokenizer_dir, label_names=labels
    )
    if config.transforms or not bert_config.is_uniform:  # keep the compressed shapes too
        artefact.save(bert_config, params, run.path / "compressed", tokenizer_dir)
    exit_figures = {}
    if exits is not None:  # the model with its exit heads, and each exit's accuracy
        with_exits = {**params, EXITS: sharding.to_host(state.params[EXITS])}
        pooling = exits.pooling
        early_exit.save_exit_model(
            run.path / "exits", bert_config, with_exits, pooling, tokenizer_dir
        )
        split = eval_splits[data.get_task(config.task).eval_splits[0]]
        batches = data.eval_batches(split, config.eval.batch_size, config.buckets)
        accuracy = early_exit.exit_accuracies(bert_config, with_exits, list(batches), pooling)
        exit_figures = {"exit_accuracy": {str(n): a for n, a in accuracy.items()}}
    summary = {
        "task": config.task,
        "metric": metric,
        "value": value,
        "eval": results,
        "steps": steps,
        "train_examples": len(train_split),
        "epochs": steps / steps_per_epoch,
        "train_seconds_this_run": train_seconds,
        "real_tokens_this_run": real_tokens,
        "padded_tokens_this_run": padded_tokens,
        "tokens_per_s": real_tokens / train_seconds if train_seconds > 0 else None,
        "params": artefact.count_params(params),
        **exit_figures,
        **figures,
        "model_dir": str(model_dir),
        # First calls of each new shape in this invocation (compilation, mostly), and with
        # precompile the seconds of compiling every program ahead of the first step.
        "compile_seconds": {
            "train": announce.seconds,
            "eval": eval_compiles.seconds,
            "ahead": ahead_seconds,
        },
        "wall_seconds": time.perf_counter() - started,  # this invocation, loading to summary
    }
    run.write_summary(summary)
    return summary


def enable_compile_cache(directory: str) -> None:
    """Use a persistent XLA compilation cache in `directory` ('' leaves JAX's setting alone,
    and so does a cache folder set outside, e.g. by $JAX_COMPILATION_CACHE_DIR)."""
    if not directory or jax.config.jax_compilation_cache_dir:
        return
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def log_progress(
    step_metrics: dict, done: int, last: int, steps: int, since: tuple[float, int, int]
) -> tuple[float, int]:
    """Logs step of `steps`, loss, tokens/s and the time left to step `last` at the pace
    since the previous such line, `since` = (its time, its step, tokens since); returns
    (now, done)."""
    loss = float(step_metrics["loss"])  # waits for the step, so `now` is when it ended
    now = time.perf_counter()
    t, step, tokens = since
    left = (now - t) / max(done - step, 1) * (last - done)
    rate = tokens / max(now - t, 1e-9)
    log.info(
        "step %d/%d loss %.4f %.0f tokens/s, %s left",
        done,
        steps,
        loss,
        rate,
        progress.duration(left),
    )
    return now, done


def check_finite(step_metrics: list[dict], step: int, mngr) -> list[dict]:
    """The metrics as floats; stops on a NaN/inf loss or parameter, before it is checkpointed."""
    values = [{k: float(v) for k, v in m.items()} for m in jax.device_get(step_metrics)]
    for m in values:
        if not (math.isfinite(m["loss"]) and math.isfinite(m["param_norm"])):
            raise FloatingPointError(
                f"non-finite loss or parameters by step {step}; last good checkpoint: step "
                f"{mngr.latest_step()} in {mngr.directory}. Lower train.lr or check the data."
            )
    return values
