"""GLUE tasks: loading (hub or local TSV), tokenization, length bucketing and batching."""

import csv
import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np

from jaxcompress import assets
from jaxcompress.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUB_DATASET = "nyu-mll/glue"
PAD_ID = 0
_TOKENIZE_CHUNK = 8192


class GlueFormatError(ValueError, UserError):
    """A local GLUE TSV file does not have the expected format."""


class GlueFileNotFoundError(UserError, FileNotFoundError):
    """A local GLUE TSV file that does not exist."""


class UnknownTaskError(UserError, ValueError):
    """A task name that is not a GLUE task."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: hub columns and labels, plus how to read its local TSV files.

    `text_keys` are the text column names of the hub dataset; `text_columns` are the matching
    TSV column names. `file_labels` lists the label strings as written in the TSV, in the
    order of the hub's integer labels (empty for regression). Files without a header use
    `fixed_columns` as their column names.
    """

    name: str
    text_keys: tuple[str, ...]
    num_labels: int
    is_regression: bool
    eval_splits: tuple[str, ...]
    label_names: tuple[str, ...]
    tsv_dir: str
    split_files: tuple[tuple[str, str], ...]
    text_columns: tuple[str, ...]
    label_column: str
    file_labels: tuple[str, ...]
    fixed_columns: tuple[str, ...] | None = None

    @property
    def is_pair(self) -> bool:
        return len(self.text_keys) == 2

    def file_name(self, split: str) -> str:
        files = dict(self.split_files)
        if split not in files:
            raise ValueError(
                f"task {self.name!r} has no local split {split!r}; local splits: {sorted(files)}"
            )
        return files[split]


_TRAIN_DEV = (("train", "train.tsv"), ("validation", "dev.tsv"))
_NLI_LABELS = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="cola",
            text_keys=("sentence",),
            num_labels=2,
            is_regression=False,
            eval_splits=("validation",),
            label_names=("unacceptable", "acceptable"),
            tsv_dir="CoLA",
            split_files=_TRAIN_DEV,
            text_columns=("sentence",),
            label_column="label",
            file_labels=("0", "1"),
            fixed_columns=("source", "label", "original_label", "sentence"),
        ),
        TaskSpec(
            name="sst2",
            text_keys=("sentence",),
            num_labels=2,
            is_regression=False,
            eval_splits=("validation",),
            label_names=("negative", "positive"),
            tsv_dir="SST-2",
            split_files=_TRAIN_DEV,
            text_columns=("sentence",),
            label_column="label",
            file_labels=("0", "1"),
        ),
        TaskSpec(
            name="mrpc",
            text_keys=("sentence1", "sentence2"),
            num_labels=2,
            is_regression=False,
            eval_splits=("validation",),
            label_names=("not_equivalent", "equivalent"),
            tsv_dir="MRPC",
            split_files=_TRAIN_DEV,
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            file_labels=("0", "1"),
        ),
        TaskSpec(
            name="stsb",
            text_keys=("sentence1", "sentence2"),
            num_labels=1,
            is_regression=True,
            eval_splits=("validation",),
            label_names=(),
            tsv_dir="STS-B",
            split_files=_TRAIN_DEV,
            text_columns=("sentence1", "sentence2"),
            label_column="score",
            file_labels=(),
        ),
        TaskSpec(
            name="qqp",
            text_keys=("question1", "question2"),
            num_labels=2,
            is_regression=False,
            eval_splits=("validation",),
            label_names=("not_duplicate", "duplicate"),
            tsv_dir="QQP",
            split_files=_TRAIN_DEV,
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            file_labels=("0", "1"),
        ),
        TaskSpec(
            name="mnli",
            text_keys=("premise", "hypothesis"),
            num_labels=3,
            is_regression=False,
            eval_splits=("validation_matched", "validation_mismatched"),
            label_names=("entailment", "neutral", "contradiction"),
            tsv_dir="MNLI",
            split_files=(
                ("train", "train.tsv"),
                ("validation_matched", "dev_matched.tsv"),
                ("validation_mismatched", "dev_mismatched.tsv"),
            ),
            text_columns=("sentence1", "sentence2"),
            label_column="gold_label",
            file_labels=("entailment", "neutral", "contradiction"),
        ),
        TaskSpec(
            name="qnli",
            text_keys=("question", "sentence"),
            num_labels=2,
            is_regression=False,
            eval_splits=("validation",),
            label_names=_NLI_LABELS,
            tsv_dir="QNLI",
            split_files=_TRAIN_DEV,
            text_columns=("question", "sentence"),
            label_column="label",
            file_labels=_NLI_LABELS,
        ),
        TaskSpec(
            name="rte",
            text_keys=("sentence1", "sentence2"),
            num_labels=2,
            is_regression=False,
            eval_splits=("validation",),
            label_names=_NLI_LABELS,
            tsv_dir="RTE",
            split_files=_TRAIN_DEV,
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            file_labels=_NLI_LABELS,
        ),
        TaskSpec(
            name="wnli",
            text_keys=("sentence1", "sentence2"),
            num_labels=2,
            is_regression=False,
            eval_splits=("validation",),
            label_names=("not_entailment", "entailment"),
            tsv_dir="WNLI",
            split_files=_TRAIN_DEV,
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            file_labels=("0", "1"),
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """Returns the spec of a GLUE task by its hub config name (e.g. 'sst2')."""
    if name not in TASKS:
        raise UnknownTaskError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------
# Loading


def load_split(
    task: str, split: str, glue_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """Loads one split with the columns of the hub dataset: text keys, 'label', 'idx'.

    With `glue_dir` None the split comes from the Hugging Face hub; otherwise it is read from
    `<glue_dir>/<task folder>/<file>.tsv` as written by GLUE's download script.
    """
    spec = get_task(task)
    if glue_dir is None:
        # Fail at once offline, instead of after the datasets library's retries.
        assets.require_hub(f"dataset {HUB_DATASET!r} ({spec.name})", "glue_dir")
        return datasets.load_dataset(HUB_DATASET, spec.name, split=split)
    path = Path(glue_dir) / spec.tsv_dir / spec.file_name(split)
    if not path.is_file():
        raise GlueFileNotFoundError(
            f"GLUE file not found: {path}; point glue_dir ({assets.how_to_set('glue_dir')}, "
            f"or the config's glue_dir) at the folder holding the task folders "
            f"({spec.tsv_dir}/, ...)"
        )
    stat = path.stat()
    return _local_split(spec.name, str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _local_split(task: str, path: str, mtime_ns: int, size: int) -> datasets.Dataset:
    """A local TSV as a dataset, parsed once per process while the file is unchanged (every
    stage of a sweep, and every run of a test process, reads the same train file; a
    `Dataset` is immutable: `select` and `map` return new ones)."""
    spec = get_task(task)
    return datasets.Dataset.from_dict(read_tsv(spec, Path(path)), features=_features(spec))


def read_tsv(spec: TaskSpec, path: Path) -> dict[str, list]:
    """Reads a local GLUE TSV into hub-style columns; raises GlueFormatError on a bad row
    (or a byte that is not UTF-8, naming its line)."""
    try:
        return _read_tsv(spec, path)
    except UnicodeDecodeError as e:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8-sig")
            start = e.start  # not reached for a file that decodes as a whole
        except UnicodeDecodeError as whole:
            start = whole.start
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        raise GlueFormatError(
            f"{path}: line {line}: byte 0x{raw[start]:02x} (column {column}) is not UTF-8; "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_tsv(spec: TaskSpec, path: Path) -> dict[str, list]:
    columns: dict[str, list] = {key: [] for key in spec.text_keys}
    columns["label"] = []
    columns["idx"] = []
    # utf-8-sig drops the BOM that starts MRPC's header; QUOTE_NONE because some fields
    # start with '"' and must be kept verbatim.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.fixed_columns is None:
            header = next(reader, None)
            if header is None:
                raise GlueFormatError(f"{path}: line 1: empty file, expected a header row")
            _check_header(spec, path, header)
        else:
            header = list(spec.fixed_columns)
        text_pos = [header.index(col) for col in spec.text_columns]
        label_pos = header.index(spec.label_column)
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            if len(row) != len(header):
                raise GlueFormatError(f"{where}: expected {len(header)} columns, got {len(row)}")
            for key, pos in zip(spec.text_keys, text_pos, strict=True):
                if not row[pos].strip():
                    raise GlueFormatError(f"{where}: empty text in column {header[pos]!r}")
                columns[key].append(row[pos])
            columns["label"].append(_parse_label(spec, row[label_pos], where))
            columns["idx"].append(len(columns["idx"]))
    return columns


def _check_header(spec: TaskSpec, path: Path, header: list[str]) -> None:
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
    if missing:
        raise GlueFormatError(f"{path}: line 1: header {header} lacks columns {missing}")


def _parse_label(spec: TaskSpec, text: str, where: str) -> int | float:
    if spec.is_regression:
        try:
            value = float(text)
        except ValueError:
            raise GlueFormatError(f"{where}: label {text!r} is not a number") from None
        if not math.isfinite(value):
            raise GlueFormatError(f"{where}: label {text!r} is not finite")
        return value
    if text not in spec.file_labels:
        raise GlueFormatError(
            f"{where}: unknown label {text!r}; expected one of {spec.file_labels}"
        )
    return spec.file_labels.index(text)


def _features(spec: TaskSpec) -> datasets.Features:
    features = {key: datasets.Value("string") for key in spec.text_keys}
    if spec.is_regression:
        features["label"] = datasets.Value("float32")
    else:
        features["label"] = datasets.ClassLabel(names=list(spec.label_names))
    features["idx"] = datasets.Value("int32")
    return datasets.Features(features)


# ---------------------------------------------------------------------------------------------
# Tokenization


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
    """Ragged token ids of one split; row i is example i of the dataset it came from."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_split(
    dataset: datasets.Dataset, task: str, tokenizer: "PreTrainedTokenizerBase", max_length: int
) -> TokenizedSplit:
    """Tokenizes every example (pairs for two-text tasks), truncated to max_length, unpadded."""
    spec = get_task(task)
    texts = [list(dataset[key]) for key in spec.text_keys]
    input_ids: list[np.ndarray] = []
    token_type_ids: list[np.ndarray] = []
    for start in range(0, len(dataset), _TOKENIZE_CHUNK):
        chunk = [column[start : start + _TOKENIZE_CHUNK] for column in texts]
        encoded = tokenizer(
            *chunk,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_token_type_ids=True,
            return_attention_mask=False,
        )
        input_ids.extend(np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"])
        token_type_ids.extend(np.asarray(t, dtype=np.int32) for t in encoded["token_type_ids"])
    label_dtype = np.float32 if spec.is_regression else np.int32
    return TokenizedSplit(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        labels=np.asarray(dataset["label"], dtype=label_dtype),
        lengths=np.array([len(ids) for ids in input_ids], dtype=np.int32),
    )


def token_counts(split: TokenizedSplit, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in a split (special tokens included)."""
    ids = np.concatenate(split.input_ids) if len(split) else np.zeros(0, np.int32)
    if ids.size and ids.max() >= vocab_size:
        raise ValueError(f"token id {ids.max()} outside a vocabulary of {vocab_size}")
    return np.bincount(ids, minlength=vocab_size)


# ---------------------------------------------------------------------------------------------
# Batching


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Returns the smallest bucket that holds `length` tokens."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"length {length} exceeds the largest bucket of {sorted(buckets)}")
    return min(fitting)


def epoch_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, sort_window: int = 50
) -> list[np.ndarray]:
    """Index batches of one training epoch, a deterministic function of (seed, epoch).

    Indices are shuffled, grouped into windows of `sort_window` batches, sorted by length
    within each window so that a batch holds similar lengths, cut into full batches, and the
    batch order is shuffled. `sort_window` 0 or 1 gives plain shuffled batches.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    # Drop the remainder before sorting: dropped after, it would always be the longest
    # examples of the last window.
    order = order[: len(order) // batch_size * batch_size]
    if sort_window > 1:
        window = sort_window * batch_size
        for start in range(0, len(order), window):
            order[start : start + window] = _sort_by_length(order[start : start + window], lengths)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _sort_by_length(indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return indices[np.argsort(lengths[indices], kind="stable")]


def make_batch(
    split: TokenizedSplit,
    indices: np.ndarray,
    buckets: Sequence[int],
    batch_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """Pads the examples `indices` (the global batch) and returns this host's rows.

    The length is the bucket of the longest example in the global batch, so all hosts get the
    same shape. Rows beyond len(indices) up to `batch_size` are padding with example_mask 0.
    """
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise ValueError("make_batch needs at least one example index")
    batch_size = len(indices) if batch_size is None else batch_size
    if batch_size < len(indices):
        raise ValueError(f"batch_size {batch_size} is smaller than {len(indices)} indices")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")

    length = bucket_length(int(split.lengths[indices].max()), buckets)
    rows = batch_size // process_count
    first = process_index * rows
    input_ids = np.full((rows, length), PAD_ID, dtype=np.int32)
    token_type_ids = np.zeros((rows, length), dtype=np.int32)
    attention_mask = np.zeros((rows, length), dtype=np.int32)
    labels = np.zeros((rows,), dtype=split.labels.dtype)
    example_mask = np.zeros((rows,), dtype=np.float32)
    for row, example in enumerate(indices[first : first + rows]):
        n = split.lengths[example]
        input_ids[row, :n] = split.input_ids[example]
        token_type_ids[row, :n] = split.token_type_ids[example]
        attention_mask[row, :n] = 1
        labels[row] = split.labels[example]
        example_mask[row] = 1.0
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "example_mask": example_mask,
    }


def eval_batches(
    split: TokenizedSplit,
    batch_size: int,
    buckets: Sequence[int],
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in length order, in batches of fixed size.

    The last batch is padded with example_mask 0. The extra key 'index' holds each row's
    example index in `split` (-1 for padding) so callers can restore the original order.
    """
    order = np.argsort(split.lengths, kind="stable")
    rows = batch_size // process_count
    first = process_index * rows
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = make_batch(split, chunk, buckets, batch_size, process_index, process_count)
        index = np.full((batch_size,), -1, dtype=np.int32)
        index[: len(chunk)] = chunk
        batch["index"] = index[first : first + rows]
        yield batch
