"""Tests for GLUE loading, tokenization and batching on the local GLUE files."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxcompress.data import glue as data
from jaxcompress.data.glue import GlueFormatError, TokenizedSplit

BUCKETS = (32, 64, 128)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path):
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def mrpc_dev_split(glue_dir: Path, tokenizer) -> TokenizedSplit:
    dataset = data.load_split("mrpc", "validation", glue_dir).select(range(200))
    return data.tokenize_split(dataset, "mrpc", tokenizer, max_length=128)


# ---------------------------------------------------------------------------------------------
# Task specs


def test_all_nine_tasks_defined():
    assert set(data.TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert data.get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert data.get_task("qnli").text_keys == ("question", "sentence")
    assert data.get_task("qqp").text_keys == ("question1", "question2")
    assert data.get_task("mnli").text_keys == ("premise", "hypothesis")
    stsb = data.get_task("stsb")
    assert (stsb.num_labels, stsb.is_regression) == (1, True)
    assert all(
        spec.num_labels == len(spec.label_names)
        for spec in data.TASKS.values()
        if spec.name != "stsb"
    )


def test_get_task_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="unknown GLUE task 'sst-2'.*sst2.*wnli"):
        data.get_task("sst-2")


def test_unknown_local_split(glue_dir: Path):
    with pytest.raises(ValueError, match="no local split 'test'"):
        data.load_split("rte", "test", glue_dir)


# ---------------------------------------------------------------------------------------------
# Local TSV loading


@pytest.mark.parametrize(
    ("task", "split", "rows"),
    [
        ("sst2", "train", 67349),
        ("sst2", "validation", 872),
        ("cola", "train", 8551),
        ("cola", "validation", 1043),
        ("mrpc", "train", 3668),
        ("mrpc", "validation", 408),
        ("stsb", "train", 5749),
        ("stsb", "validation", 1500),
        ("rte", "train", 2490),
        ("rte", "validation", 277),
        ("qnli", "validation", 5463),
    ],
)
def test_row_counts_and_columns(glue_dir: Path, task: str, split: str, rows: int):
    dataset = data.load_split(task, split, glue_dir)
    spec = data.get_task(task)
    assert len(dataset) == rows
    assert dataset.column_names == [*spec.text_keys, "label", "idx"]
    assert dataset["idx"][:3] == [0, 1, 2]
    assert dataset["idx"][-1] == rows - 1


def test_label_counts(glue_dir: Path):
    sst2 = Counter(data.load_split("sst2", "validation", glue_dir)["label"])
    assert sst2 == {1: 444, 0: 428}
    rte = Counter(data.load_split("rte", "validation", glue_dir)["label"])
    assert rte == {0: 146, 1: 131}  # entailment 0, not_entailment 1 (hub convention)
    cola = Counter(data.load_split("cola", "validation", glue_dir)["label"])
    assert cola == {1: 721, 0: 322}
    qnli = Counter(data.load_split("qnli", "validation", glue_dir)["label"])
    assert qnli == {0: 2702, 1: 2761}


def test_hub_style_features(glue_dir: Path):
    rte = data.load_split("rte", "validation", glue_dir)
    assert rte.features["label"].names == ["entailment", "not_entailment"]
    stsb = data.load_split("stsb", "validation", glue_dir)
    assert stsb.features["label"].dtype == "float32"
    assert stsb[0] == {
        "sentence1": "A man with a hard hat is dancing.",
        "sentence2": "A man wearing a hard hat is dancing.",
        "label": 5.0,
        "idx": 0,
    }
    assert stsb[1]["label"] == pytest.approx(4.75)


def test_fields_starting_with_quote_kept_verbatim(glue_dir: Path):
    train = data.load_split("rte", "train", glue_dir)
    # Index 2164's sentence1 opens a '"' that is never closed; a quoting reader would
    # swallow the following lines into it.
    raw = (glue_dir / "RTE" / "train.tsv").read_text(encoding="utf-8").split("\n")[2165]
    idx, sentence1, sentence2, label = raw.split("\t")
    row = train[2164]
    assert row["sentence1"] == sentence1
    assert row["sentence1"].startswith("\"That film wasn't too successful")
    assert row["sentence2"] == sentence2
    assert row["label"] == ["entailment", "not_entailment"].index(label)
    assert (idx, row["idx"]) == ("2164", 2164)

    dev = data.load_split("rte", "validation", glue_dir)
    assert dev[137]["sentence1"].startswith('"It\'s Only a Play" is Terrence McNally')
    assert dev[137]["sentence2"] == "Broadway is in New York."


def test_mrpc_read_despite_bom(glue_dir: Path):
    dev = data.load_split("mrpc", "validation", glue_dir)
    assert dev[0]["label"] == 1
    assert dev[0]["sentence1"].startswith("He said the foodservice pie business doesn 't fit")
    assert dev[0]["sentence2"].startswith('" The foodservice pie business does not fit')
    assert Counter(dev["label"]) == {1: 279, 0: 129}


def test_cola_without_header(glue_dir: Path):
    dev = data.load_split("cola", "validation", glue_dir)
    assert dev[0] == {
        "sentence": "The sailors rode the breeze clear of the rocks.",
        "label": 1,
        "idx": 0,
    }


def _write_rte(root: Path, lines: list[str]) -> Path:
    folder = root / "RTE"
    folder.mkdir()
    path = folder / "dev.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        ("1\tonly two columns", "expected 4 columns, got 2"),
        ("1\tA premise.\tA hypothesis.\tmaybe", "unknown label 'maybe'"),
        ("1\tA premise.\t  \tentailment", "empty text in column 'sentence2'"),
        ("1\tA premise.\tA hypothesis.\tentailment\textra", "expected 4 columns, got 5"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, bad_row: str, problem: str):
    path = _write_rte(
        tmp_path,
        [
            "index\tsentence1\tsentence2\tlabel",
            "0\tA premise.\tA hypothesis.\tentailment",
            bad_row,
            "2\tA premise.\tA hypothesis.\tnot_entailment",
        ],
    )
    with pytest.raises(GlueFormatError) as info:
        data.load_split("rte", "validation", tmp_path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert problem in message
    assert isinstance(info.value, ValueError)


def test_unparsable_regression_label(tmp_path: Path):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    good = "0\tg\tf\ty\t0\tnone\tnone\tA man.\tA woman.\t2.500"
    bad = "1\tg\tf\ty\t1\tnone\tnone\tA man.\tA woman.\tfive"
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    )
    (folder / "train.tsv").write_text("\n".join([header, good, good, bad]) + "\n")
    with pytest.raises(GlueFormatError, match=r"train\.tsv: line 4: label 'five' is not a number"):
        data.load_split("stsb", "train", tmp_path)


def test_missing_header_column(tmp_path: Path):
    _write_rte(tmp_path, ["index\tpremise\tsentence2\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(GlueFormatError, match=r"line 1: .*lacks columns \['sentence1'\]"):
        data.load_split("rte", "validation", tmp_path)


def test_missing_file_names_path_and_setting(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_split("wnli", "train", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "WNLI" / "train.tsv") in message
    assert "glue_dir" in message


# ---------------------------------------------------------------------------------------------
# Tokenization


def test_tokenize_pair_task(glue_dir: Path, tokenizer, mrpc_dev_split: TokenizedSplit):
    split = mrpc_dev_split
    assert len(split) == 200
    assert split.labels.dtype == np.int32 and split.labels.shape == (200,)
    assert split.lengths.dtype == np.int32
    assert [len(ids) for ids in split.input_ids] == split.lengths.tolist()
    assert all(ids.dtype == np.int32 for ids in split.input_ids)

    dataset = data.load_split("mrpc", "validation", glue_dir)
    expected = tokenizer(dataset[5]["sentence1"], dataset[5]["sentence2"])
    np.testing.assert_array_equal(split.input_ids[5], expected["input_ids"])
    np.testing.assert_array_equal(split.token_type_ids[5], expected["token_type_ids"])
    # [CLS] a [SEP] b [SEP]: segment ids are 0 up to the first [SEP], then 1.
    ids, types = split.input_ids[5], split.token_type_ids[5]
    first_sep = int(np.argmax(ids == tokenizer.sep_token_id))
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert types[: first_sep + 1].tolist() == [0] * (first_sep + 1)
    assert types[first_sep + 1 :].tolist() == [1] * (len(ids) - first_sep - 1)
    assert split.labels[:5].tolist() == dataset.select(range(5))["label"]


def test_tokenize_truncates_and_regression_labels(glue_dir: Path, tokenizer):
    dataset = data.load_split("stsb", "validation", glue_dir).select(range(100))
    split = data.tokenize_split(dataset, "stsb", tokenizer, max_length=16)
    assert split.lengths.max() == 16
    assert split.labels.dtype == np.float32
    assert split.labels[:2].tolist() == [5.0, 4.75]


def test_token_counts(tokenizer, mrpc_dev_split: TokenizedSplit):
    counts = data.token_counts(mrpc_dev_split, len(tokenizer))
    assert counts.shape == (len(tokenizer),)
    assert counts.sum() == mrpc_dev_split.lengths.sum()
    assert counts[tokenizer.cls_token_id] == len(mrpc_dev_split)
    assert counts[tokenizer.sep_token_id] == 2 * len(mrpc_dev_split)
    with pytest.raises(ValueError, match="outside a vocabulary"):
        data.token_counts(mrpc_dev_split, 100)


# ---------------------------------------------------------------------------------------------
# Bucketing and training batches


def test_bucket_length():
    assert data.bucket_length(1, BUCKETS) == 32
    assert data.bucket_length(32, BUCKETS) == 32
    assert data.bucket_length(33, BUCKETS) == 64
    assert data.bucket_length(100, (128, 32, 64)) == 128
    with pytest.raises(ValueError, match="length 129 exceeds the largest bucket"):
        data.bucket_length(129, BUCKETS)


@pytest.fixture(scope="module")
def lengths() -> np.ndarray:
    return np.random.default_rng(0).integers(5, 128, size=1003).astype(np.int32)


def test_epoch_batches_deterministic_and_varying(lengths: np.ndarray):
    def run(seed: int, epoch: int) -> list[list[int]]:
        return [b.tolist() for b in data.epoch_batches(lengths, 16, seed=seed, epoch=epoch)]

    assert run(1, 0) == run(1, 0)
    assert run(1, 0) != run(1, 1)
    assert run(1, 0) != run(2, 0)


@pytest.mark.parametrize("sort_window", [0, 1, 4, 50])
def test_epoch_batches_full_and_disjoint(lengths: np.ndarray, sort_window: int):
    batches = data.epoch_batches(lengths, 16, seed=3, epoch=2, sort_window=sort_window)
    assert len(batches) == 1003 // 16
    assert all(b.shape == (16,) for b in batches)
    used = np.concatenate(batches)
    assert len(np.unique(used)) == len(used) == 62 * 16
    assert used.min() >= 0 and used.max() < 1003


def test_epoch_batches_sorting_reduces_padding(lengths: np.ndarray):
    def padding_waste(sort_window: int) -> int:
        batches = data.epoch_batches(lengths, 16, seed=0, epoch=0, sort_window=sort_window)
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    plain, sorted_ = padding_waste(0), padding_waste(50)
    assert padding_waste(1) == plain
    assert sorted_ < 0.2 * plain


def test_epoch_batches_remainder_not_biased_to_long(lengths: np.ndarray):
    # Over many epochs the dropped examples must be a random subset, not the longest ones.
    dropped = []
    for epoch in range(20):
        used = np.concatenate(data.epoch_batches(lengths, 16, seed=0, epoch=epoch))
        dropped.append(np.setdiff1d(np.arange(len(lengths)), used))
    mean_dropped = lengths[np.concatenate(dropped)].mean()
    assert abs(mean_dropped - lengths.mean()) < 15


def test_make_batch_pair_task(mrpc_dev_split: TokenizedSplit):
    split = mrpc_dev_split
    indices = np.array([3, 7, 11, 19])
    batch = data.make_batch(split, indices, BUCKETS)
    longest = int(split.lengths[indices].max())
    width = data.bucket_length(longest, BUCKETS)
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (4, width),
        "token_type_ids": (4, width),
        "attention_mask": (4, width),
        "labels": (4,),
        "example_mask": (4,),
    }
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    assert batch["example_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["attention_mask"].sum(axis=1), split.lengths[indices])
    for row, example in enumerate(indices):
        n = split.lengths[example]
        np.testing.assert_array_equal(batch["input_ids"][row, :n], split.input_ids[example])
        np.testing.assert_array_equal(
            batch["token_type_ids"][row, :n], split.token_type_ids[example]
        )
        assert not batch["input_ids"][row, n:].any() and not batch["token_type_ids"][row, n:].any()
        assert 1 in batch["token_type_ids"][row]
    np.testing.assert_array_equal(batch["labels"], split.labels[indices])
    np.testing.assert_array_equal(batch["example_mask"], np.ones(4))


def test_make_batch_padding_rows(mrpc_dev_split: TokenizedSplit):
    batch = data.make_batch(mrpc_dev_split, np.array([0, 1, 2]), BUCKETS, batch_size=8)
    assert batch["input_ids"].shape[0] == 8
    np.testing.assert_array_equal(batch["example_mask"], [1, 1, 1, 0, 0, 0, 0, 0])
    assert not batch["input_ids"][3:].any() and not batch["attention_mask"][3:].any()
    assert not batch["labels"][3:].any()


def test_make_batch_host_slices_concatenate(mrpc_dev_split: TokenizedSplit):
    indices = np.array([5, 17, 42, 99, 150, 8])
    whole = data.make_batch(mrpc_dev_split, indices, BUCKETS, batch_size=8)
    parts = [
        data.make_batch(mrpc_dev_split, indices, BUCKETS, 8, process_index=i, process_count=2)
        for i in range(2)
    ]
    assert (
        parts[0]["input_ids"].shape
        == parts[1]["input_ids"].shape
        == (4, whole["input_ids"].shape[1])
    )
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)


def test_make_batch_errors(mrpc_dev_split: TokenizedSplit):
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        data.make_batch(mrpc_dev_split, np.arange(4), BUCKETS, 4, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="smaller than 4 indices"):
        data.make_batch(mrpc_dev_split, np.arange(4), BUCKETS, batch_size=2)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        data.make_batch(mrpc_dev_split, np.arange(4), (8,))


# ---------------------------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_cover_every_example_once(mrpc_dev_split: TokenizedSplit):
    batches = list(data.eval_batches(mrpc_dev_split, 32, BUCKETS))
    assert len(batches) == 7  # ceil(200 / 32)
    assert all(b["input_ids"].shape[0] == 32 for b in batches)
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["example_mask"] for b in batches])
    assert index.dtype == np.int32
    np.testing.assert_array_equal(mask, index >= 0)
    assert sorted(index[index >= 0].tolist()) == list(range(200))
    assert (index < 0).sum() == 7 * 32 - 200

    # Restore the original order from per-row outputs (here: the labels).
    labels = np.concatenate([b["labels"] for b in batches])
    restored = np.empty(200, dtype=labels.dtype)
    restored[index[index >= 0]] = labels[index >= 0]
    np.testing.assert_array_equal(restored, mrpc_dev_split.labels)

    # Length order keeps padding small.
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths)


def test_eval_batches_host_slices(mrpc_dev_split: TokenizedSplit):
    whole = list(data.eval_batches(mrpc_dev_split, 32, BUCKETS))
    parts = [
        list(data.eval_batches(mrpc_dev_split, 32, BUCKETS, process_index=i, process_count=2))
        for i in range(2)
    ]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, value)
