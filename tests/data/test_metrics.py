"""Tests for GLUE metrics against hand-computed values."""

import math

import numpy as np
import pytest

from jaxcompress.data import metrics

# Shared binary case. Per example (pred, label): (1,1) TP, (0,1) FN, (1,1) TP, (1,0) FP, (0,0) TN.
PREDS = np.array([1, 0, 1, 1, 0])
LABELS = np.array([1, 1, 1, 0, 0])


def test_accuracy():
    # 3 of 5 correct (examples 0, 2, 4).
    assert metrics.accuracy(PREDS, LABELS) == pytest.approx(0.6)
    assert metrics.accuracy(LABELS, LABELS) == 1.0
    assert metrics.accuracy(1 - LABELS, LABELS) == 0.0


def test_f1():
    # TP=2, FP=1, FN=1: F1 = 2*2 / (2*2 + 1 + 1) = 4/6.
    assert metrics.f1(PREDS, LABELS) == pytest.approx(2 / 3)
    assert metrics.f1(LABELS, LABELS) == 1.0
    assert metrics.f1(1 - LABELS, LABELS) == 0.0
    # No positive predicted and none true: defined as 0.0.
    assert metrics.f1(np.zeros(4, int), np.zeros(4, int)) == 0.0


def test_matthews_binary():
    # TP=2, TN=1, FP=1, FN=1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6.
    assert metrics.matthews_corrcoef(PREDS, LABELS) == pytest.approx(1 / 6)
    assert metrics.matthews_corrcoef(LABELS, LABELS) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef(1 - LABELS, LABELS) == pytest.approx(-1.0)


def test_matthews_multiclass():
    # Confusion (rows true 0..2): [[1,0,0],[0,1,1],[0,0,1]]; true sums [1,2,1], pred sums
    # [1,1,2], trace 3, n 4. cov(t,p) = 3*4 - (1+2+2) = 7; cov(p,p) = 16 - 6 = 10;
    # cov(t,t) = 16 - 6 = 10. MCC = 7 / sqrt(100) = 0.7.
    preds = np.array([0, 1, 2, 2])
    labels = np.array([0, 1, 2, 1])
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(0.7)


def test_matthews_degenerate_is_zero():
    # A constant prediction (or constant labels) makes the denominator zero.
    assert metrics.matthews_corrcoef(np.ones(5, int), LABELS) == 0.0
    assert metrics.matthews_corrcoef(PREDS, np.zeros(5, int)) == 0.0
    assert metrics.matthews_corrcoef(np.ones(3, int), np.ones(3, int)) == 0.0


def test_pearson():
    # x = [1,2,3], y = [1,2,4]: deviations [-1,0,1] and [-4/3,-1/3,5/3]; sum of products 3,
    # sum of squares 2 and 14/3. r = 3 / sqrt(28/3) = sqrt(27/28).
    assert metrics.pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(
        math.sqrt(27 / 28)
    )
    x = np.array([0.5, 1.5, 4.0, 2.0])
    assert metrics.pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert metrics.pearson(x, -x) == pytest.approx(-1.0)


def test_spearman_with_ties():
    # Ranks of x = [1,2,2,3] are [1,2.5,2.5,4]; of y, [1,2,3,4]. Pearson on the ranks:
    # products of deviations 2.25 + 0 + 0 + 2.25 = 4.5; squares 4.5 and 5. rho = sqrt(0.9).
    x = np.array([1.0, 2.0, 2.0, 3.0])
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.spearman(x, y) == pytest.approx(math.sqrt(0.9))
    # Monotone but non-linear: rank correlation 1, linear correlation below 1.
    z = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert metrics.spearman(z, z**3) == pytest.approx(1.0)
    assert metrics.pearson(z, z**3) < 0.95
    assert metrics.spearman(z, -z) == pytest.approx(-1.0)


def test_shape_mismatch_and_empty():
    with pytest.raises(ValueError, match="equal shape"):
        metrics.accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least one example"):
        metrics.f1(np.zeros(0), np.zeros(0))


def _logits(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes)[predictions] * 2.0 - 0.5


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("cola", {"matthews_correlation": 1 / 6}),
        ("sst2", {"accuracy": 0.6}),
        ("mrpc", {"accuracy": 0.6, "f1": 2 / 3}),
        ("qqp", {"accuracy": 0.6, "f1": 2 / 3}),
        ("qnli", {"accuracy": 0.6}),
        ("rte", {"accuracy": 0.6}),
        ("wnli", {"accuracy": 0.6}),
    ],
)
def test_task_metrics_binary_tasks(task: str, expected: dict[str, float]):
    result = metrics.task_metrics(task, _logits(PREDS, 2), LABELS)
    assert result == pytest.approx(expected)
    assert set(result) == set(expected)
    assert all(type(v) is float for v in result.values())


def test_task_metrics_mnli_three_classes():
    logits = np.array([[3.0, 0.1, -1.0], [0.0, 0.2, 0.1], [-1.0, -2.0, 0.5], [1.0, 0.0, 0.9]])
    # argmax = [0, 1, 2, 0]; labels [0, 1, 1, 2]: 2 of 4 correct.
    assert metrics.task_metrics("mnli", logits, np.array([0, 1, 1, 2])) == {"accuracy": 0.5}


@pytest.mark.parametrize("shape", [(3,), (3, 1)])
def test_task_metrics_stsb(shape: tuple[int, ...]):
    scores = np.array([1.0, 2.0, 3.0]).reshape(shape)
    result = metrics.task_metrics("stsb", scores, np.array([1.0, 2.0, 4.0]))
    assert set(result) == {"pearson", "spearmanr"}
    assert result["pearson"] == pytest.approx(math.sqrt(27 / 28))
    assert result["spearmanr"] == pytest.approx(1.0)


def test_task_metrics_bad_input():
    with pytest.raises(ValueError, match="unknown GLUE task 'sst-2'"):
        metrics.task_metrics("sst-2", _logits(PREDS, 2), LABELS)
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\)"):
        metrics.task_metrics("sst2", PREDS, LABELS)
    with pytest.raises(ValueError, match=r"stsb needs scores"):
        metrics.task_metrics("stsb", np.zeros((3, 2)), np.zeros(3))


def test_main_metric():
    assert metrics.main_metric("cola") == "matthews_correlation"
    assert metrics.main_metric("stsb") == "pearson"
    assert metrics.main_metric("mrpc") == metrics.main_metric("qqp") == "f1"
    for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert metrics.main_metric(task) == "accuracy"
    with pytest.raises(ValueError, match="valid tasks: cola"):
        metrics.main_metric("glue")
