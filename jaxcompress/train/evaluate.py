"""The jitted eval step, predictions over a split, and GLUE metrics of a model."""

from __future__ import annotations

import functools
import logging

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxcompress.compress.distill.objective import (
    forward,
)
from jaxcompress.config import buckets_of
from jaxcompress.data import glue as data
from jaxcompress.data import metrics
from jaxcompress.models.bert import Bert, BertConfig
from jaxcompress.train import progress, sharding

log = logging.getLogger(__name__)


def make_eval_step(
    model: Bert, mesh: Mesh | None = None, announce: progress.CompileAnnouncer | None = None
):
    """A jitted `(params, batch) -> logits` that announces each new batch shape's compilation
    (through `announce`, which also sums the seconds, if given). With a mesh of several
    devices, the batch (the same on every process) is split over its data axes and the
    logits come back whole."""
    if mesh is None or mesh.size == 1:
        compiled = jax.jit(lambda params, batch: forward(model, params, batch, None).logits)
    else:

        @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
        def logits(params, batch):
            return forward(model, params, batch, None).logits

        def compiled(params, batch):
            return logits(params, sharding.full_batch_to_global(batch, mesh))

    announce = announce or progress.CompileAnnouncer(log, "eval step")

    def step(params, batch):
        return announce(batch["input_ids"].shape, compiled, params, batch)

    return step if mesh is None or mesh.size == 1 else sharding.within(mesh, step)


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
