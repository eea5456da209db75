"""A run's `quantize` section: the fake-quantized model, Q-BERT's bits per layer, and the
packed low-bit artefact it saves."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

import jax
import ml_collections

from jaxcompress import core
from jaxcompress.compress.distill.objective import Batch, forward, model_params, task_loss
from jaxcompress.compress.quant import hessian, qat
from jaxcompress.compress.quant import pack as quant_pack
from jaxcompress.compress.quant.activations import QuantizedModel, calibrate
from jaxcompress.data import glue as data
from jaxcompress.models import artefact
from jaxcompress.models.bert import Bert, Linear
from jaxcompress.train.run_dir import write_json

log = logging.getLogger(__name__)


def quantize_model(
    config: ml_collections.ConfigDict, model: Bert, params: dict, train_split: data.TokenizedSplit
) -> Bert | QuantizedModel:
    """`model` as `config.quantize` asks: fake-quantized weights and dense-layer inputs, the
    latter with ranges calibrated on the first train batches (of the step-0 model, so a
    resumed run gets the same ranges) or dynamic."""
    q = config.quantize
    rules = qat.rules_from_config(q)
    if q.activation_bits and not 2 <= q.activation_bits <= 8:
        raise ValueError(f"quantize.activation_bits must be 0 or 2..8, got {q.activation_bits}")
    if q.activation_ranges not in ("calibrated", "dynamic"):
        raise ValueError(
            f"quantize.activation_ranges must be 'calibrated' or 'dynamic': {q.activation_ranges}"
        )
    if rules is None and not q.activation_bits and not q.mixed_bits_budget:
        return model

    def first_batches(n: int) -> list[Batch]:  # of the run's first epoch, as training sees it
        order = data.epoch_batches(
            train_split.lengths, config.train.batch_size, config.seed, 0, config.train.sort_window
        )
        return [data.make_batch(train_split, indices, config.buckets) for indices in order[:n]]

    layer_bits = None
    if q.mixed_bits_budget:
        batches = first_batches(q.hessian_batches)
        layer_bits = hessian_bits(config, model, model_params(params), batches)
        tail = rules if rules is not None else [(".*", None)]
        rules = hessian.mixed_precision_rules(layer_bits, q.mixed_group_size, tail=tail)
    weights = qat.qat(rules) if rules is not None else core.identity()
    quantized = QuantizedModel(
        model, weights, rules=rules, layer_bits=layer_bits, layer_types=(Linear,)
    )
    if not q.activation_bits:
        return quantized
    ranges = None
    if q.activation_ranges == "calibrated":
        batches = first_batches(q.calibration_batches)
        ranges = calibrate_bert(quantized, model_params(params), batches)
    return dataclasses.replace(quantized, activation_bits=q.activation_bits, ranges=ranges)


def calibrate_bert(
    model: Bert | QuantizedModel, params: dict, batches: Iterable[Batch]
) -> dict[str, jax.Array]:
    """The largest input absmax of every BERT `Linear` layer over `batches` (no dropout):
    `calibrate` with BERT's batches and its own dense layer class."""

    @jax.jit
    def logits(params, batch):
        args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return model.apply({"params": params}, *args).logits

    return calibrate(lambda batch: logits(params, batch), batches, layer_types=(Linear,), jit=False)


def hessian_bits(
    config: ml_collections.ConfigDict, model: Bert, params: dict, batches: list[Batch]
) -> dict[str, int]:
    """Q-BERT's bit width per encoder layer: Hutchinson traces of the task loss on `batches`
    (deterministic in the seed), ranked per parameter, assigned under the average budget."""
    q = config.quantize

    def loss_fn(p):
        losses = [
            task_loss(forward(model, p, b, None).logits, b["labels"], b["example_mask"])
            for b in batches
        ]
        return sum(losses) / len(losses)

    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    groups = hessian.encoder_layer_group
    estimate = hessian.hutchinson_trace(loss_fn, params, groups, key, q.hessian_samples)
    sensitivity = {g: max(float(v), 0.0) for g, v in estimate.per_param.items()}
    sizes = hessian.group_sizes(params, groups)
    bits = hessian.assign_bits(
        sensitivity, sizes, tuple(q.mixed_choices), budget_bits=q.mixed_bits_budget
    )
    log.info("Q-BERT bits per layer %s (trace per parameter %s)", bits, sensitivity)
    return bits


def save_quantized(
    config: ml_collections.ConfigDict,
    model: QuantizedModel,
    params: dict,
    path: Path,
    tokenizer_dir: str | Path,
) -> dict[str, int]:
    """The packed low-bit artefact (`params.safetensors`: codes, scales, float leaves) and
    `quantization.json` (activation bits and calibrated ranges) in `path`; returns the
    packed bytes with and without embeddings (float bytes when only activations are
    quantized)."""
    path.mkdir(parents=True, exist_ok=True)
    ranges = {k: float(v) for k, v in (model.ranges or {}).items()}
    activations = {"bits": model.activation_bits, "ranges": ranges or None}
    record = {"activations": activations, "layer_bits": model.layer_bits}
    write_json(path / "quantization.json", record)
    if model.rules is None:
        return artefact.saved_bytes(params)
    quant_pack.save(path / "params.safetensors", params, model.rules)
    return quant_pack.packed_bytes(params, model.rules)
