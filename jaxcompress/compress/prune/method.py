"""Unstructured pruning as a training-time method: the `prune` config section, parsed once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxcompress import core
from jaxcompress.compress.method import LoadParams, Plan, Rate, Setup, TrainingMethod
from jaxcompress.compress.prune import sparse
from jaxcompress.compress.prune import unstructured as prune

METHODS = ("", "magnitude", "movement")


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """A checked `prune` section.

    Attributes:
      method: 'magnitude', 'movement' or 'fixed' (the masks of `masks_from`).
      rules: the weights pruned, as `core` rules.
      final: the final sparsity (soft movement: the sigmoid(score) threshold).
      initial: the sparsity at `begin`.
      begin: the fraction of training where the schedule starts.
      end: the fraction of training where it reaches `final` (== begin: one shot).
      frequency: steps between mask updates.
      scope: 'layer' or 'global'.
      movement: 'hard' or 'soft'.
      score_l1: the weight of the mean sigmoid(score) penalty.
      score_init: movement scores' initial value.
      score_lr: movement scores' peak learning rate; 0 = the run's ("sum": 1).
      score_update: "adam" (scores train as the weights, at `score_lr`) or "sum" (each
        step adds -score_lr * their gradient).
      scores_from: the model the run's start model was fine-tuned from: scores start at
        each weight's movement away from zero in that fine-tune, |W| - |W_from|.
      score_magnitude: scores also start at this multiple of |W_from| (|W| without
        `scores_from`).
      masks_from: the pruned model whose zeros fix the masks ('fixed').
    """

    method: str
    rules: tuple[tuple[str, Any], ...]
    final: float = 0.0
    initial: float = 0.0
    begin: float = 0.0
    end: float = 0.0
    frequency: int = 10
    scope: str = "layer"
    movement: str = "hard"
    score_l1: float = 0.0
    score_init: float = 0.0
    score_lr: float = 0.0
    score_update: str = "adam"
    scores_from: str = ""
    score_magnitude: float = 0.0
    masks_from: str = ""

    def schedule(self, total_steps: int) -> prune.Schedule:
        """The schedule in optimizer steps of a run of `total_steps`."""
        return prune.Schedule(
            final=self.final,
            initial=self.initial,
            begin_step=round(self.begin * total_steps),
            end_step=round(self.end * total_steps),
            frequency=self.frequency,
        )


def parse(cfg: Any) -> PruneSpec | None:
    """The spec of a config's `prune` section, None when it prunes nothing.

    Args:
      cfg: the section (attributes as in `jaxcompress.config.finetune_defaults().prune`).

    Returns:
      A `PruneSpec`, or None.

    Raises:
      ValueError: an unknown method, a schedule out of order or a sparsity outside [0, 1).
    """
    if cfg.method not in METHODS:
        raise ValueError(f"prune.method must be one of {METHODS}, got {cfg.method!r}")
    rules = ((cfg.params, True), (".*", None))
    if cfg.masks_from:
        if cfg.method:
            raise ValueError("prune.masks_from fixes the masks; leave prune.method empty")
        return PruneSpec("fixed", rules, masks_from=cfg.masks_from)
    if not cfg.method:
        return None
    for key in ("scores_from", "score_magnitude"):
        if cfg[key] and cfg.method != "movement":
            raise ValueError(
                f"prune.{key} starts movement scores; prune.method is {cfg.method!r}: "
                f"set it to 'movement' or leave {key} unset"
            )
    if not 0.0 <= cfg.begin <= cfg.end <= 1.0:
        raise ValueError(f"prune: need 0 <= begin <= end <= 1, got {cfg.begin}, {cfg.end}")
    soft = (cfg.method, cfg.movement) == ("movement", "soft")
    final = cfg.threshold if soft else cfg.sparsity
    if not 0.0 <= final < 1.0 or not 0.0 <= cfg.initial_sparsity < 1.0:
        raise ValueError(f"prune: sparsity and threshold must be in [0, 1), got {final}")
    return PruneSpec(
        method=cfg.method,
        rules=rules,
        final=final,
        initial=0.0 if soft else cfg.initial_sparsity,
        begin=cfg.begin,
        end=cfg.end,
        frequency=cfg.frequency,
        scope=cfg.scope,
        movement=cfg.movement,
        score_l1=cfg.score_l1,
        score_init=cfg.score_init,
        score_lr=cfg.score_lr,
        score_update=cfg.score_update,
        scores_from=cfg.scores_from,
        score_magnitude=cfg.score_magnitude,
    )


def prepare(spec: PruneSpec, params: core.Params, load_params: LoadParams) -> core.Params:
    """`params` with movement scores beside the pruned weights (movement pruning only),
    started from the fine-tune from `spec.scores_from` if set."""
    if spec.method != "movement":
        return params
    start = load_params(spec.scores_from) if spec.scores_from else None
    return prune.add_movement_scores(
        params, spec.rules, spec.score_init, start, spec.score_magnitude
    )


def reparam(spec: PruneSpec, total_steps: int, load_params=None) -> core.Reparam:
    """The pruning reparameterization of `spec` for a run of `total_steps`; 'fixed' loads
    its masks with `load_params(spec.masks_from)`."""
    if spec.method == "fixed":
        return prune.fixed_masks(prune.masks_from_zeros(load_params(spec.masks_from), spec.rules))
    schedule = spec.schedule(total_steps)
    if spec.method == "magnitude":
        return prune.magnitude_pruning(spec.rules, schedule, spec.scope)
    return prune.movement_pruning(spec.rules, schedule, spec.movement, spec.scope)


def plan(spec: PruneSpec, params: core.Params, setup: Setup) -> Plan:
    """Pruning's part of a run: the reparam, the score penalty, the sparsity in force every
    step, and the sparse artefact (`sparse/params.safetensors`) with its sparsity figures."""
    pruning = reparam(spec, setup.total_steps, setup.load_params)

    def penalty(params):
        mean = prune.movement_penalty(params)
        return spec.score_l1 * mean, {"score_penalty": mean}

    def export(params, state, directory: Path) -> dict[str, Any]:
        pruned = (pruning.finalize or pruning.apply)(params, state)
        sparse.save(directory / "sparse" / "params.safetensors", pruned, spec.rules)
        stats = prune.pruning_stats(pruned, spec.rules)
        return {**stats, **sparse.sparse_bytes(pruned, spec.rules)}

    return Plan(
        reparam=pruning,
        penalty=penalty if spec.score_l1 else None,
        metrics=lambda state: {"sparsity": state.target},
        export=export,
    )


def score_rates(spec: PruneSpec) -> dict[str, Rate]:
    """How movement scores train, if not as the weights: at their own AdamW rate
    (`score_lr`; Sanh et al.'s code: 1e-2, a hundred times the weights' rate, since Adam moves
    each score about its rate a step and a sigmoid threshold needs scores that move), or
    summed (`score_update='sum'`): S = -score_lr * sum over steps of dL/dW' * W, the paper's
    definition, whose ranking weighs each weight's size; Adam divides that size out."""
    if spec.method != "movement":
        return {}
    if spec.score_update == "sum":
        return {prune.SCORE_SUFFIX: Rate(spec.score_lr or 1.0, "sum")}
    if spec.score_lr > 0:
        return {prune.SCORE_SUFFIX: Rate(spec.score_lr)}
    return {}


PRUNING = TrainingMethod(
    section="prune",
    parse=parse,
    plan=plan,
    prepare=prepare,
    not_weights=(prune.SCORE_SUFFIX,),
    extra_rates=score_rates,
)
