"""The plug-in contract of training-time methods: a config section in, a reparam and its hooks out.

A training loop (ours: `jaxcompress.train.loop`) runs every method of
`jaxcompress.compress.registry.TRAINING_METHODS` the same way:

1. `parse(section)` turns the method's config section into a typed spec, once, at the
   boundary (None: the method is off). Bad values raise ValueError naming the key.
2. `prepare(spec, params, load_params)` adds the method's trainable extras beside their
   weights (movement scores, LSQ step sizes, binary-split halves), reading saved models
   with `load_params` where they start from one.
3. `plan(spec, params, setup)` builds what the method contributes to the run, a `Plan`:
   its `core.Reparam` (chained in registry order and kept inside the optimizer state by
   `core.with_reparam`), and optional hooks: a model wrapper, a loss penalty, per-step
   metrics and an export of its artefact.

A new method is a module or folder under `jaxcompress/compress/`, a `TrainingMethod` there,
its line in the registry and a conformance case; the loop is not edited.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax

from jaxcompress import core

Spec = Any
Model = Any  # anything with the `.apply` and `.config` of a flax linen model
LoadParams = Callable[[str], core.Params]  # a saved model's params by its path (or hub id)


class Setup(NamedTuple):
    """What a training run offers a method when it plans (all model- and data-agnostic).

    Attributes:
      total_steps: optimizer steps of the whole run (schedules are fractions of it).
      seed: the run's seed.
      batches: `n -> list of batches`: the run's first `n` training batches, as training
        sees them (calibration, Hessian estimates); loaded on first use.
      apply_fn: `(params, batch) -> outputs` of the float model without dropout.
      loss_fn: `(params, batch) -> scalar` task loss of the float model without dropout.
      layer_types: the model's dense layer classes (whose inputs activation quantization
        sees), or None for flax's own.
      load_params: `path -> params` of a saved model of the same architecture.
    """

    total_steps: int
    seed: int
    batches: Callable[[int], list[Any]]
    apply_fn: Callable[[core.Params, Any], Any]
    loss_fn: Callable[[core.Params, Any], jax.Array]
    layer_types: tuple[type, ...] | None
    load_params: LoadParams


def _unchanged(model: Model) -> Model:
    return model


class Plan(NamedTuple):
    """What one method contributes to one run.

    Attributes:
      reparam: the training-time reparameterization (its state lives in the optimizer state).
      model: `model -> model` the loss and evaluation run (e.g. quantized layer inputs).
      penalty: `params -> (weighted loss term, metrics to log)`, or None.
      metrics: `reparam state -> {name: scalar}` logged every step, or None.
      export: `(params, state, directory) -> {name: value}`: writes the method's artefact
        under `directory` from the params its reparam receives (its own extras included)
        and returns figures for the run summary (e.g. `bytes`); later methods' figures
        replace earlier ones of the same name. None: nothing to write.
    """

    reparam: core.Reparam
    model: Callable[[Model], Model] = _unchanged
    penalty: Callable[[core.Params], tuple[jax.Array, dict[str, jax.Array]]] | None = None
    metrics: Callable[[core.State], dict[str, jax.Array]] | None = None
    export: Callable[[core.Params, core.State, Path], dict[str, Any]] | None = None


class Rate(NamedTuple):
    """How a method's extras (movement scores, say) train, if not as the weights do.

    Attributes:
      lr: the peak learning rate.
      rule: "adam": the run's AdamW at this peak rate, under the run's warmup and decay;
        "sum": each step adds -lr * gradient (constant, no moments): the extras accumulate
        their gradients, as Sanh et al. define movement scores.
    """

    lr: float
    rule: str = "adam"


def _no_extras(spec: Spec, params: core.Params, load_params: LoadParams) -> core.Params:
    return params


@dataclasses.dataclass(frozen=True)
class TrainingMethod:
    """A training-time method as a training loop plugs it in.

    Attributes:
      section: the name of its config section.
      parse: `section -> spec or None` (off); raises ValueError for bad values.
      plan: `(spec, params, setup) -> Plan`; `params` are the step-0 params as the
        method's reparam receives them (earlier methods' `apply` done, own extras present).
      prepare: `(spec, params, load_params) -> params` with the method's trainable extras
        added; `load_params(path)` gives a saved model's params (as `Setup.load_params`).
      not_weights: key suffixes of its extras that are not weights (movement scores, LSQ
        step sizes): the optimizer gives them no weight decay.
      extra_rates: `spec -> {key suffix: Rate}` of extras that train at their own rate or
        by their own rule; others take the run's AdamW at `train.lr`.
    """

    section: str
    parse: Callable[[Any], Spec | None]
    plan: Callable[[Spec, core.Params, Setup], Plan]
    prepare: Callable[[Spec, core.Params, LoadParams], core.Params] = _no_extras
    not_weights: tuple[str, ...] = ()
    extra_rates: Callable[[Spec], dict[str, Rate]] = lambda spec: {}
