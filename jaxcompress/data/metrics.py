"""GLUE evaluation metrics, as GLUE defines them, over numpy arrays."""

import numpy as np
import scipy.stats

_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}
# GLUE's headline metric per task (Devlin et al. Table 1): F1 for the paraphrase tasks.
_MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}


def _check_pair(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions and labels must be 1-D of equal shape, got {predictions.shape} "
            f"and {labels.shape}"
        )
    if predictions.size == 0:
        raise ValueError("metrics need at least one example")
    return predictions, labels


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the label."""
    predictions, labels = _check_pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class 1; 0.0 when there are no true or predicted positives."""
    predictions, labels = _check_pair(predictions, labels)
    true_pos = np.sum((predictions == 1) & (labels == 1))
    false_pos = np.sum((predictions == 1) & (labels != 1))
    false_neg = np.sum((predictions != 1) & (labels == 1))
    denominator = 2 * true_pos + false_pos + false_neg
    return float(2 * true_pos / denominator) if denominator else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multiclass form, as sklearn); 0.0 when undefined."""
    predictions, labels = _check_pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    n = labels.size
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (encoded[:n], encoded[n:]), 1.0)
    true_sum = confusion.sum(axis=1)
    pred_sum = confusion.sum(axis=0)
    cov_true_pred = np.trace(confusion) * n - true_sum @ pred_sum
    cov_pred_pred = n * n - pred_sum @ pred_sum
    cov_true_true = n * n - true_sum @ true_sum
    if cov_pred_pred == 0 or cov_true_true == 0:
        return 0.0
    return float(cov_true_pred / np.sqrt(cov_true_true * cov_pred_pred))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation coefficient (nan when either input is constant)."""
    predictions, labels = _check_pair(predictions, labels)
    return float(scipy.stats.pearsonr(predictions, labels).statistic)


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation, ties given their average rank."""
    predictions, labels = _check_pair(predictions, labels)
    return float(scipy.stats.spearmanr(predictions, labels).statistic)


_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}


def _check_task(task: str) -> None:
    if task not in _TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(_TASK_METRICS)}")


def task_metrics(task: str, logits_or_scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics of a task, from logits (N, C), or for stsb scores (N,) or (N, 1)."""
    _check_task(task)
    outputs = np.asarray(logits_or_scores)
    if task == "stsb":
        if outputs.ndim == 2 and outputs.shape[1] == 1:
            outputs = outputs[:, 0]
        if outputs.ndim != 1:
            raise ValueError(f"stsb needs scores of shape (N,) or (N, 1), got {outputs.shape}")
        predictions = outputs
    else:
        if outputs.ndim != 2:
            raise ValueError(f"{task} needs logits of shape (N, C), got {outputs.shape}")
        predictions = np.argmax(outputs, axis=-1)
    return {name: _METRIC_FNS[name](predictions, labels) for name in _TASK_METRICS[task]}


def main_metric(task: str) -> str:
    """The single metric reported for a task: GLUE's headline one (F1 for mrpc and qqp)."""
    _check_task(task)
    return _MAIN_METRIC.get(task, "accuracy")
