"""A run's training loss: task loss, logit distillation and intermediate-layer terms."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxcompress.compress.distill import losses as distill
from jaxcompress.models.bert import Bert, BertConfig, BertOutput, layer_projections

Batch = dict[str, jax.Array]
# (params, batch, dropout key or None, teacher params or None) -> (loss, auxiliary metrics)
LossFn = Callable[[Any, Batch, jax.Array | None, Any], tuple[jax.Array, dict[str, jax.Array]]]
# Top-level keys of the trainable tree that the model does not read: distillation-only
# parameters (projections) and early-exit heads (`early_exit`).
DISTILL_PARAMS = "distill"
EXITS = "exits"


def task_loss(logits: jax.Array, labels: jax.Array, example_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy (classification) or squared error (one output: regression)."""
    if logits.shape[-1] == 1:
        per_example = jnp.square(logits[:, 0] - labels)
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per_example * example_mask) / jnp.maximum(jnp.sum(example_mask), 1.0)


def forward(model: Bert, params, batch: Batch, rng: jax.Array | None, **kwargs):
    """The model on a batch; dropout on when a key is given."""
    return model.apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
        **kwargs,
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """The weights of every loss term (see `config.distill`); zero switches a term off."""

    alpha: float = 0.5
    temperature: float = 2.0
    logit_loss: str = "kl"
    prediction: float = 1.0
    hidden: float = 0.0
    hidden_loss: str = "mse"
    embedding: float = 0.0
    attention: float = 0.0
    patient: float = 0.0
    relation: float = 0.0
    relation_heads: int = 0
    layer_map: str = "uniform"

    def __post_init__(self):
        if self.logit_loss not in ("kl", "mse"):
            raise ValueError(f"distill.logit_loss must be 'kl' or 'mse', got {self.logit_loss!r}")
        if self.hidden_loss not in ("mse", "cosine"):
            raise ValueError(f"distill.hidden_loss must be 'mse' or 'cosine': {self.hidden_loss!r}")

    @classmethod
    def from_config(cls, d: ml_collections.ConfigDict) -> Objective:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    @property
    def uses_hidden_states(self) -> bool:
        return bool(self.hidden or self.embedding or self.patient)

    @property
    def uses_attentions(self) -> bool:
        return bool(self.attention or (self.relation and not self.relation_heads))

    @property
    def uses_layers(self) -> bool:
        return self.uses_hidden_states or self.uses_attentions or bool(self.relation)

    def teacher_layers(self, student: BertConfig, teacher: BertConfig) -> tuple[int, ...]:
        strategy = self.layer_map
        if strategy not in ("uniform", "skip", "last"):
            strategy = [int(t) for t in strategy.split(",")]
        return distill.layer_map(strategy, student.num_hidden_layers, teacher.num_hidden_layers)


def init_distill_params(
    objective: Objective, student: BertConfig, teacher: BertConfig
) -> dict[str, jax.Array]:
    """Learned projections of student states into the teacher's width, when they differ.

    They start as the truncated identity, so a student sliced from the teacher's first
    dimensions is compared with exactly those dimensions at step 0.
    """
    if student.hidden_size == teacher.hidden_size:
        return {}
    eye = jnp.eye(student.hidden_size, teacher.hidden_size, dtype=jnp.float32)
    out = {}
    if objective.hidden or objective.patient:
        out["hidden"] = eye
    if objective.embedding:
        out["embedding"] = eye
    return out


def check_compatible(objective: Objective, student: BertConfig, teacher: BertConfig) -> None:
    """Fails early, naming the term, when student and teacher shapes cannot be compared."""
    n = student.num_hidden_layers
    if objective.attention:
        for m, t in enumerate(objective.teacher_layers(student, teacher)):
            if student.layer_heads(m) != teacher.layer_heads(t - 1):
                raise ValueError(
                    f"distill.attention: student layer {m} has {student.layer_heads(m)} heads, "
                    f"teacher layer {t - 1} {teacher.layer_heads(t - 1)}; use distill.relation "
                    "with relation_heads > 0 for different head counts"
                )
    if objective.relation and not objective.relation_heads:
        s, t = student.layer_heads(n - 1), teacher.layer_heads(teacher.num_hidden_layers - 1)
        if s != t:
            raise ValueError(
                f"distill.relation with relation_heads=0 (MiniLM) needs equal last-layer heads "
                f"(student {s}, teacher {t}); set relation_heads > 0 (MiniLMv2)"
            )


def _run(model: Bert, params, batch: Batch, rng, objective: Objective):
    """Outputs with what the objective needs: hidden states, attentions, and q/k/v."""
    kwargs = {
        "output_hidden_states": objective.uses_hidden_states,
        "output_attentions": objective.uses_attentions,
    }
    if objective.relation:
        out, state = forward(model, params, batch, rng, mutable=["intermediates"], **kwargs)
        return out, layer_projections(model.config, state["intermediates"])
    return forward(model, params, batch, rng, **kwargs), None


def _layer_terms(
    objective: Objective,
    mapping: tuple[int, ...],
    student: tuple[BertOutput, Any],
    teacher: tuple[BertOutput, Any],
    batch: Batch,
    projections: dict,
    teacher_heads: int,
) -> dict[str, jax.Array]:
    s_out, s_qkv = student
    t_out, t_qkv = teacher
    example_mask = batch["example_mask"]
    token_mask = batch["attention_mask"] * example_mask[:, None]
    hidden_fn = distill.hidden_mse if objective.hidden_loss == "mse" else distill.hidden_cosine
    terms = {}
    if objective.hidden:
        terms["hidden"] = jnp.mean(
            jnp.stack(
                [
                    hidden_fn(
                        s_out.hidden_states[m],
                        t_out.hidden_states[t],
                        token_mask,
                        projections.get("hidden"),
                    )
                    for m, t in enumerate(mapping, start=1)
                ]
            )
        )
    if objective.embedding:
        terms["embedding"] = distill.hidden_mse(
            s_out.hidden_states[0], t_out.hidden_states[0], token_mask, projections.get("embedding")
        )
    if objective.attention:
        terms["attention"] = jnp.mean(
            jnp.stack(
                [
                    distill.attention_kl(s_out.attentions[m], t_out.attentions[t - 1], token_mask)
                    for m, t in enumerate(mapping)
                ]
            )
        )
    if objective.patient:
        mapped = list(enumerate(mapping, start=1))
        pairs = mapped[:-1] or mapped  # the last layer is the logits' job, unless it is alone
        terms["patient"] = distill.patient_loss(
            [s_out.hidden_states[m][:, 0] for m, _ in pairs],
            [t_out.hidden_states[t][:, 0] for _, t in pairs],
            example_mask,
            projections.get("hidden"),
        )
    if objective.relation:
        if objective.relation_heads:
            terms["relation"] = sum(
                distill.relation_kl(
                    s_qkv[-1][k], t_qkv[-1][k], objective.relation_heads, token_mask
                )
                for k in ("queries", "keys", "values")
            )
        else:
            attention = distill.attention_kl(s_out.attentions[-1], t_out.attentions[-1], token_mask)
            values = distill.relation_kl(
                s_qkv[-1]["values"], t_qkv[-1]["values"], teacher_heads, token_mask
            )
            terms["relation"] = attention + values
    return terms


def make_loss(
    model: Bert,
    objective: Objective = Objective(),
    teacher: Bert | None = None,
) -> LossFn:
    """The loss of `objective`; with a teacher, it runs in the same jitted step, deterministic
    and without gradient, unless the batch carries precomputed `teacher_logits`.

    The params may hold a `DISTILL_PARAMS` entry (projections); the model ignores it.
    """
    mapping, teacher_heads = (), 0
    if teacher is not None and objective.uses_layers:
        check_compatible(objective, model.config, teacher.config)
        mapping = objective.teacher_layers(model.config, teacher.config)
        teacher_heads = teacher.config.layer_heads(teacher.config.num_hidden_layers - 1)

    def loss_fn(params, batch, rng, teacher_params):
        student = _run(model, params, batch, rng, objective)
        logits = student[0].logits
        loss = task_loss(logits, batch["labels"], batch["example_mask"])
        if teacher is None:
            return loss, {}
        if "teacher_logits" in batch and not objective.uses_layers:
            teacher_out = (BertOutput(None, None, batch["teacher_logits"]), None)
        else:
            teacher_out = jax.lax.stop_gradient(
                _run(teacher, teacher_params, batch, None, objective)
            )
        teacher_logits = teacher_out[0].logits
        if logits.shape[-1] == 1 or objective.logit_loss == "mse":
            kd = distill.logit_mse(logits, teacher_logits, batch["example_mask"])
        else:
            kd = distill.soft_cross_entropy(
                logits, teacher_logits, batch["example_mask"], objective.temperature
            )
        alpha = objective.alpha
        total = objective.prediction * ((1 - alpha) * loss + alpha * kd)
        terms = _layer_terms(
            objective,
            mapping,
            student,
            teacher_out,
            batch,
            params.get(DISTILL_PARAMS, {}),
            teacher_heads,
        )
        for name, value in terms.items():
            total = total + getattr(objective, name) * value
        return total, {
            "task_loss": loss,
            "kd_loss": kd,
            **{f"{k}_loss": v for k, v in terms.items()},
        }

    return loss_fn


def finetune_loss(
    model: Bert,
    teacher: Bert | None = None,
    alpha: float = Objective.alpha,
    temperature: float = Objective.temperature,
) -> LossFn:
    """Task loss, mixed with logit distillation from `teacher` when one is given."""
    return make_loss(model, Objective(alpha=alpha, temperature=temperature), teacher)


def model_params(params: dict) -> dict:
    """The model's parameters of a trainable tree (projections and exit heads removed)."""
    return {k: v for k, v in params.items() if k not in (DISTILL_PARAMS, EXITS)}
