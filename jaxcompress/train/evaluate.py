"""The jitted eval step, predictions over a split, and GLUE metrics of a model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxcompress import assets
from jaxcompress.compress.distill.objective import (
    forward,
)
from jaxcompress.config import buckets_of, device_buckets
from jaxcompress.data import glue as data
from jaxcompress.data import metrics
from jaxcompress.errors import UserError
from jaxcompress.models.bert import Bert, BertConfig
from jaxcompress.models.hf import resolve_model_dir
from jaxcompress.train import progress, sharding
from jaxcompress.train.inputs import get_num_outputs, load_any

log = logging.getLogger(__name__)


class EvalStep:
    """A jitted `(params, batch) -> logits` that announces each new batch shape's compilation
    (through `announce`, which also sums the seconds). With a mesh of several devices, the
    batch (the same on every process) is split over its data axes and the logits come back
    whole. A batch whose shape is in `programs` (compiled ahead, `lower`) runs that program.

    Attributes:
      programs: compiled programs by batch shape (`input_ids.shape`).
    """

    def __init__(self, model: Bert, mesh: Mesh | None, announce: progress.CompileAnnouncer) -> None:
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        replicated = {} if self.mesh is None else {"out_shardings": sharding.replicated(mesh)}
        self._jitted = jax.jit(
            lambda params, batch: forward(model, params, batch, None).logits, **replicated
        )
        self._announce = announce
        self._run = self._jitted if self.mesh is None else sharding.within(mesh, self._jitted)
        self._lower = (
            self._jitted.lower if self.mesh is None else sharding.within(mesh, self._jitted.lower)
        )
        self.programs: dict[tuple[int, ...], Callable] = {}

    def placed(self, batch: dict) -> dict:
        """`batch` as the program takes it: split over the mesh's data axes, if any."""
        return batch if self.mesh is None else sharding.full_batch_to_global(batch, self.mesh)

    def lower(self, params, batch: dict):
        """The program for `batch`'s shapes (arrays or `jax.ShapeDtypeStruct`s laid out as
        `placed` lays them), lowered; `.compile()` it and put it in `programs`."""
        return self._lower(params, batch)

    def __call__(self, params, batch: dict) -> jax.Array:
        shape = batch["input_ids"].shape
        program = self.programs.get(shape)
        if program is not None:
            return program(params, self.placed(batch))
        return self._announce(shape, lambda: self._run(params, self.placed(batch)))


def make_eval_step(
    model: Bert, mesh: Mesh | None = None, announce: progress.CompileAnnouncer | None = None
) -> EvalStep:
    """The `EvalStep` of `model`.

    Args:
      model: the model whose logits it computes.
      mesh: a mesh of several devices splits each batch over its data axes; None: one device.
      announce: logs and sums each new shape's compilation (default: a fresh one).

    Returns:
      A callable `(params, batch) -> logits`.
    """
    return EvalStep(model, mesh, announce or progress.CompileAnnouncer(log, "eval step"))


def predict(eval_step, params, split: data.TokenizedSplit, batch_size: int, buckets) -> np.ndarray:
    """The model's outputs for every example of a split, in the split's order (progress on a
    bar or, without a terminal, in the log)."""
    outputs = None
    bar = progress.Progress(
        log, f"predict {len(split)} examples", -(-len(split) // batch_size), "batch"
    )
    for batch in data.eval_batches(split, batch_size, buckets):
        index = batch.pop("index")
        logits = np.asarray(eval_step(params, batch))
        if outputs is None:
            outputs = np.zeros((len(split), logits.shape[-1]), np.float32)
        keep = index >= 0
        outputs[index[keep]] = logits[keep]
        bar.update()
    bar.close()
    return outputs


def evaluate(eval_step, params, split: data.TokenizedSplit, task: str, batch_size: int, buckets):
    """GLUE metrics of `params` on a whole tokenized split."""
    outputs = predict(eval_step, params, split, batch_size, buckets)
    return metrics.task_metrics(task, outputs, split.labels)


def evaluate_model(
    config: ml_collections.ConfigDict, bert_config: BertConfig, params, splits: dict
) -> dict[str, dict[str, float]]:
    """GLUE metrics of a model on tokenized eval splits (name -> split)."""
    return evaluate_splits(config, make_eval_step(Bert(bert_config)), params, splits)


def evaluate_splits(
    config: ml_collections.ConfigDict, eval_step, params, splits: dict
) -> dict[str, dict[str, float]]:
    """GLUE metrics of `params` under a compiled eval step on each split (name -> split)."""
    return {
        name: evaluate(
            eval_step, params, split, config.task, config.eval.batch_size, buckets_of(config)
        )
        for name, split in splits.items()
    }


def evaluate_saved(
    model: str,
    task: str,
    splits: Sequence[str] = (),
    *,
    glue_dir: str = "",
    tokenizer: str = "",
    max_length: int = 128,
    batch_size: int = 64,
    examples: int = 0,
) -> dict[str, dict[str, float]]:
    """GLUE metrics of a saved model (a Hugging Face directory, a jaxcompress one or a name
    under `model_root`) on splits of a task.

    Args:
      model: the model directory or name; its head must give the task's outputs.
      task: a GLUE task name, e.g. "sst2".
      splits: split names, the task's dev splits or "train"; () = its dev splits.
      glue_dir: folder of GLUE TSVs; "" = the configured one (`assets.glue_dir`).
      tokenizer: tokenizer directory or hub id; "" = the model's.
      max_length: tokens kept of each example.
      batch_size: examples per eval batch.
      examples: > 0 evaluates the first this many examples of each split.

    Returns:
      Split name -> metric name -> value, in the order of `splits`.
    """
    outputs = get_num_outputs(task)  # an unknown task fails before any loading
    spec = data.get_task(task)
    known = ("train", *spec.eval_splits)
    if unknown := [s for s in splits if s not in known]:
        raise UserError(f"split {unknown[0]!r}: task {task} has splits {', '.join(known)}")
    config, params = load_any(model)
    if config.num_labels != outputs:
        head = f"a {config.num_labels}-output head" if config.num_labels else "no classifier head"
        raise UserError(
            f"model {model} has {head}, but task {task} needs {outputs} outputs; "
            f"pass a model fine-tuned on {task} (or the task it was fine-tuned on)"
        )
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(resolve_model_dir(tokenizer or model))
    glue = glue_dir or assets.glue_dir()
    step = make_eval_step(Bert(config))
    buckets = device_buckets(max_length)
    results = {}
    for name in dict.fromkeys(splits or spec.eval_splits):
        ds = data.load_split(task, name, glue)
        if examples:
            ds = ds.select(range(min(examples, len(ds))))
        split = data.tokenize_split(ds, task, tokens, max_length)
        results[name] = evaluate(step, params, split, task, batch_size, buckets)
    return results
