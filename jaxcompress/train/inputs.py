"""What a run reads: the task's tokenized splits, the model with its transforms, the teacher."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import ml_collections
import numpy as np

from jaxcompress.compress import transforms
from jaxcompress.compress.distill import student
from jaxcompress.compress.distill.objective import (
    Batch,
)
from jaxcompress.compress.prune import structured
from jaxcompress.config import buckets_of, compute_dtype, glue_dir
from jaxcompress.core import StructureTransform
from jaxcompress.data import glue as data
from jaxcompress.models import artefact
from jaxcompress.models.bert import Bert, BertConfig
from jaxcompress.models.hf import load_pretrained, resolve_model_dir

log = logging.getLogger(__name__)


def get_num_outputs(task: str) -> int:
    spec = data.get_task(task)
    return 1 if spec.is_regression else spec.num_labels


def load_train_split(config: ml_collections.ConfigDict, tokenizer) -> data.TokenizedSplit:
    """The tokenized train split of the task (the `train.examples` subset if asked)."""
    train_ds = data.load_split(config.task, "train", glue_dir(config))
    if config.train.examples > 0:
        if config.train.examples > len(train_ds):
            raise ValueError(f"train.examples={config.train.examples} > {len(train_ds)} rows")
        rng = np.random.default_rng(config.train.subset_seed)
        train_ds = train_ds.select(np.sort(rng.permutation(len(train_ds))[: config.train.examples]))
    return data.tokenize_split(train_ds, config.task, tokenizer, config.max_length)


def load_task_splits(
    config: ml_collections.ConfigDict, tokenizer
) -> tuple[data.TokenizedSplit, dict]:
    """The tokenized train split (subset if asked) and every eval split of the task."""
    return load_train_split(config, tokenizer), load_eval_splits(config, tokenizer)


def load_eval_splits(
    config: ml_collections.ConfigDict, tokenizer
) -> dict[str, data.TokenizedSplit]:
    """Every eval split of the task, tokenized (its first `eval.examples` rows if set)."""
    where = glue_dir(config)
    splits = {}
    for name in data.get_task(config.task).eval_splits:
        rows = data.load_split(config.task, name, where)
        if config.eval.examples > 0:
            rows = rows.select(range(min(config.eval.examples, len(rows))))
        splits[name] = data.tokenize_split(rows, config.task, tokenizer, config.max_length)
    return splits


def load_tokenizer(config: ml_collections.ConfigDict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(config.tokenizer or config.model))


def load_any(name_or_path: str, **kwargs) -> tuple[BertConfig, dict]:
    """A jaxcompress model directory (compressed shapes kept) or a Hugging Face one."""
    if (Path(name_or_path) / artefact.CONFIG_FILE).exists():
        bert_config, params = artefact.load(name_or_path)
        head = kwargs.pop("num_labels", bert_config.num_labels)
        if head != bert_config.num_labels:
            raise ValueError(f"{name_or_path} has {bert_config.num_labels} outputs, need {head}")
        kwargs.pop("head_seed", None)
        return bert_config.replace(**kwargs), params
    return load_pretrained(name_or_path, **kwargs)


def load_model(
    config: ml_collections.ConfigDict, transform: StructureTransform | None = None
) -> tuple[BertConfig, dict]:
    """The model to train: `config.model`, then `transform` (default: `config.transforms`
    parsed and applied in order)."""
    bert_config, params = load_any(
        config.model,
        num_labels=get_num_outputs(config.task),
        head_seed=config.seed,
        dtype=compute_dtype(config.dtype),
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        layerdrop=config.layerdrop,
        remat=config.remat,
        scan_layers=config.scan_layers,
        token_keep=tuple(config.token_keep) or None,
    )
    if transform is None:
        transform = transforms.from_specs(config.transforms, transform_context(config))
    return transform(bert_config, params)


def transform_context(config: ml_collections.ConfigDict) -> transforms.TransformContext:
    """Lazily computed task data a transform may ask for: token counts of the train split;
    hidden states and task-loss gradients on its first `context_batches` batches."""

    @functools.cache
    def split() -> data.TokenizedSplit:
        return load_train_split(config, load_tokenizer(config))

    @functools.cache
    def batches() -> tuple[Batch, ...]:
        size, n = config.eval.batch_size, len(split())
        starts = range(0, min(n, size * config.context_batches), size)
        return tuple(
            data.make_batch(split(), np.arange(i, min(i + size, n)), buckets_of(config))
            for i in starts
        )

    def token_counts(vocab_size: int) -> np.ndarray:
        return data.token_counts(split(), vocab_size)

    def hidden_states(bert_config: BertConfig, params: dict):
        return student.layer_hidden_states(bert_config, params, batches())

    @functools.cache
    def gradient_fn() -> structured.GradientFn:  # compiled once per model shape
        return structured.task_gradient_fn(batches())

    def gradients(bert_config: BertConfig, params: dict):
        return gradient_fn()(bert_config, params)

    return transforms.TransformContext(
        token_counts=token_counts, hidden_states=hidden_states, gradients=gradients
    )


def load_teacher(config: ml_collections.ConfigDict) -> tuple[Bert, dict] | tuple[None, None]:
    if not config.distill.teacher:
        return None, None
    dtype = compute_dtype(config.dtype)
    teacher_config, teacher_params = load_any(config.distill.teacher, dtype=dtype)
    if teacher_config.num_labels != get_num_outputs(config.task):
        raise ValueError(f"teacher {config.distill.teacher} has the wrong number of outputs")
    return Bert(teacher_config), teacher_params


def total_steps(config: ml_collections.ConfigDict, n_train: int) -> int:
    if config.train.steps > 0:
        return config.train.steps
    return max(1, math.floor(config.train.epochs * (n_train // config.train.batch_size)))
