"""What a compressed model is measured by: task metric, parameters, saved bytes, latency."""

from __future__ import annotations

import ml_collections

from jaxcompress.data import metrics
from jaxcompress.experiments.latency import inference_latency
from jaxcompress.models import artefact
from jaxcompress.models.bert import BertConfig
from jaxcompress.train.evaluate import evaluate_model


def measure_model(
    config: ml_collections.ConfigDict,
    bert_config: BertConfig,
    params: dict,
    splits: dict,
    latency: bool = False,
) -> dict:
    """Dev metrics of `config.task` on `splits`, size, and (if asked) CPU/GPU latency."""
    results = evaluate_model(config, bert_config, params, splits)
    metric = metrics.main_metric(config.task)
    first = next(iter(results))
    row = {
        "metric": metric,
        "value": results[first][metric],
        "eval": results,
        "params": artefact.count_params(params),
        **artefact.saved_bytes(params),
    }
    if latency:
        row["latency_s"] = inference_latency(bert_config, params)["median_s"]
    return row
