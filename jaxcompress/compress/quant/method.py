"""Quantization-aware training as a training-time method: the `quantize` section, parsed once.

Fake-quantized weights (QAT, LSQ steps, BinaryBERT's split, Q-BERT's bits per layer) run as
the method's reparam; quantized layer inputs (calibrated or dynamic ranges) wrap the model;
the export is the packed low-bit artefact and `quantization.json`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax

from jaxcompress import core
from jaxcompress.compress.method import LoadParams, Plan, Setup, TrainingMethod
from jaxcompress.compress.quant import hessian, qat
from jaxcompress.compress.quant import pack as quant_pack
from jaxcompress.compress.quant.activations import ACTIVATION_SCHEMES, QuantizedModel, calibrate
from jaxcompress.compress.quant.quantizers import QuantSpec
from jaxcompress.config import ConfigValueError
from jaxcompress.models import artefact, bert_rules

log = logging.getLogger(__name__)

RANGES = ("calibrated", "dynamic")


@dataclasses.dataclass(frozen=True)
class QuantizeSpec:
    """A checked `quantize` section.

    Attributes:
      rules: the QAT rules (config `rules`, then BERT's kernel and embedding presets), or
        None when weights stay float.
      activation_bits: the bits of every dense layer's input; 0 keeps them float.
      activation_ranges: 'calibrated' (ranges from the first train batches) or 'dynamic'.
      activation_scheme: 'symmetric' (the integer grid of `activation_bits`) or 'fp8'
        (e4m3 values, `activations.fake_quant_input_fp8`; `activation_bits` is 8).
      calibration_batches: train batches the ranges are calibrated on.
      binary_split: start BinaryBERT's training by splitting the binary-spec weights.
      mixed_bits_budget: > 0: Q-BERT's bits per encoder layer under this average.
      mixed_choices: the widths Q-BERT chooses from.
      mixed_group_size: rows per group-wise scale of Q-BERT's layers.
      hessian_samples: Hutchinson probes per trace.
      hessian_batches: train batches of the traced loss.
    """

    rules: tuple[tuple[str, QuantSpec | None], ...] | None
    activation_bits: int = 0
    activation_ranges: str = "calibrated"
    activation_scheme: str = "symmetric"
    calibration_batches: int = 8
    binary_split: bool = False
    mixed_bits_budget: float = 0.0
    mixed_choices: tuple[int, ...] = (2, 3, 4, 8)
    mixed_group_size: int = 128
    hessian_samples: int = 16
    hessian_batches: int = 2


def _parse_spec(key: str, text: str) -> QuantSpec | None:
    """`qat.parse_spec`, its error (a `UserError`: one line from the CLI) naming the key."""
    try:
        return qat.parse_spec(text)
    except ValueError as e:
        raise ConfigValueError(f"config key {key}: {e}") from None


def rules_from_config(cfg: Any) -> list[tuple[str, QuantSpec | None]] | None:
    """The QAT rules of a `quantize` section (its `rules`, then BERT's kernel and embedding
    presets), or None when no weight is quantized."""
    kernels = _parse_spec("quantize.kernels", cfg.kernels)
    embeddings = _parse_spec("quantize.embeddings", cfg.embeddings)
    extra = [
        (pattern, _parse_spec(f"quantize.rules {pattern!r}", text)) for pattern, text in cfg.rules
    ]
    if kernels is None and embeddings is None and all(s is None for _, s in extra):
        return None
    return extra + bert_rules.weight_rules(kernels, embeddings)


def parse(cfg: Any) -> QuantizeSpec | None:
    """The spec of a config's `quantize` section, None when it quantizes nothing.

    Args:
      cfg: the section (attributes as in `jaxcompress.config.finetune_defaults().quantize`).

    Returns:
      A `QuantizeSpec`, or None.

    Raises:
      ValueError: a spec that does not parse, bits or ranges out of their domain, or a
        binary split without binary rules.
    """
    rules = rules_from_config(cfg)
    if cfg.activation_bits and not 2 <= cfg.activation_bits <= 8:
        raise ValueError(f"quantize.activation_bits must be 0 or 2..8, got {cfg.activation_bits}")
    if cfg.activation_ranges not in RANGES:
        raise ValueError(
            f"quantize.activation_ranges must be 'calibrated' or 'dynamic': {cfg.activation_ranges}"
        )
    scheme = cfg.get("activation_scheme", "symmetric")
    if scheme not in ACTIVATION_SCHEMES:
        raise ValueError(f"quantize.activation_scheme must be 'symmetric' or 'fp8', got {scheme!r}")
    if scheme == "fp8" and cfg.activation_bits != 8:
        raise ValueError(
            "quantize.activation_scheme='fp8' needs quantize.activation_bits=8 (e4m3 is 8 bits),"
            f" got {cfg.activation_bits}"
        )
    if cfg.binary_split and rules is None:
        raise ValueError("quantize.binary_split needs binary quantize.kernels or rules")
    if rules is None and not cfg.activation_bits and not cfg.mixed_bits_budget:
        return None
    return QuantizeSpec(
        rules=None if rules is None else tuple(rules),
        activation_bits=cfg.activation_bits,
        activation_ranges=cfg.activation_ranges,
        activation_scheme=scheme,
        calibration_batches=cfg.calibration_batches,
        binary_split=cfg.binary_split,
        mixed_bits_budget=cfg.mixed_bits_budget,
        mixed_choices=tuple(cfg.mixed_choices),
        mixed_group_size=cfg.mixed_group_size,
        hessian_samples=cfg.hessian_samples,
        hessian_batches=cfg.hessian_batches,
    )


def prepare(spec: QuantizeSpec, params: core.Params, load_params: LoadParams) -> core.Params:
    """`params` with learned step sizes (LSQ) beside their weights and BinaryBERT's halves."""
    if spec.rules is None:
        return params
    params = qat.add_lsq_steps(params, spec.rules)
    return qat.add_binary_split(params, spec.rules) if spec.binary_split else params


def hessian_bits(spec: QuantizeSpec, params: core.Params, setup: Setup) -> dict[str, int]:
    """Q-BERT's bit width per encoder layer: Hutchinson traces of the task loss on the first
    `hessian_batches` train batches (deterministic in the seed), ranked per parameter and
    assigned under the average budget."""
    batches = setup.batches(spec.hessian_batches)

    def loss_fn(p):
        return sum(setup.loss_fn(p, b) for b in batches) / len(batches)

    key = jax.random.fold_in(jax.random.key(setup.seed), 1)
    groups = hessian.encoder_layer_group
    estimate = hessian.hutchinson_trace(loss_fn, params, groups, key, spec.hessian_samples)
    sensitivity = {g: max(float(v), 0.0) for g, v in estimate.per_param.items()}
    sizes = hessian.group_sizes(params, groups)
    bits = hessian.assign_bits(
        sensitivity, sizes, spec.mixed_choices, budget_bits=spec.mixed_bits_budget
    )
    log.info("Q-BERT bits per layer %s (trace per parameter %s)", bits, sensitivity)
    return bits


def plan(spec: QuantizeSpec, params: core.Params, setup: Setup) -> Plan:
    """Quantization's part of a run: fake-quantized weights as the reparam; quantized layer
    inputs, with ranges calibrated on the first train batches of the step-0 model (so a
    resumed run gets the same ranges), around the model; the packed artefact as export."""
    rules = spec.rules
    layer_bits = None
    if spec.mixed_bits_budget:
        layer_bits = hessian_bits(spec, params, setup)
        tail = rules if rules is not None else ((".*", None),)
        rules = tuple(hessian.mixed_precision_rules(layer_bits, spec.mixed_group_size, tail=tail))
    weights = qat.qat(rules) if rules is not None else core.identity()
    ranges = None
    if spec.activation_bits and spec.activation_ranges == "calibrated":
        seen = jax.jit(weights.apply)(params, weights.init(params))  # one program, not per op
        forward = jax.jit(lambda p, batch: setup.apply_fn(p, batch))  # traced in the context
        batches = setup.batches(spec.calibration_batches)
        ranges = calibrate(
            lambda batch: forward(seen, batch), batches, layer_types=setup.layer_types, jit=False
        )

    def model(inner):
        if not spec.activation_bits:
            return inner
        return QuantizedModel(
            inner,
            core.identity(),
            activation_bits=spec.activation_bits,
            ranges=ranges,
            layer_types=setup.layer_types,
            activation_scheme=spec.activation_scheme,
        )

    def export(params, state, directory: Path) -> dict[str, Any]:
        path = directory / "quantized"
        path.mkdir(parents=True, exist_ok=True)
        found = {k: float(v) for k, v in (ranges or {}).items()}
        record = {
            "activations": {
                "bits": spec.activation_bits,
                "scheme": spec.activation_scheme,
                "ranges": found or None,
            },
            "layer_bits": layer_bits,
        }
        artefact.write_json(path / "quantization.json", record)
        if rules is None:
            return artefact.saved_bytes(params)
        quant_pack.save(path / "params.safetensors", params, rules)
        return quant_pack.packed_bytes(params, rules)

    return Plan(reparam=weights, model=model, export=export)


QUANTIZATION = TrainingMethod(
    section="quantize",
    parse=parse,
    plan=plan,
    prepare=prepare,
    not_weights=(qat.LSQ_SUFFIX,),
)
