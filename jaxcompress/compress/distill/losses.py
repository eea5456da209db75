"""Knowledge distillation losses over model outputs, and teacher-to-student layer maps."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Losses take student first, teacher second; the teacher side is wrapped in stop_gradient.
# Masks: `example_mask` (B,) marks real examples (None: every example counts), `token_mask`
# (B, L) real tokens of them.


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _teacher(x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(x).astype(jnp.float32)


def _kl_rows(teacher_log_p: jax.Array, student_log_p: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis; entries where the teacher has no mass contribute 0."""
    p = jnp.exp(teacher_log_p)
    return jnp.sum(jnp.where(p > 0, p * (teacher_log_p - student_log_p), 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------
# Prediction layer


def soft_cross_entropy(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    example_mask: jax.Array | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    """KL(teacher || student) of temperature-softened distributions, times T^2 (Hinton et al.).

    Zero exactly when the student's logits equal the teacher's (up to a per-example shift).

    Args:
      student_logits: (B, C) logits of the student.
      teacher_logits: (B, C) logits of the teacher; no gradient flows into them.
      example_mask: (B,) marks the real examples; None: every example counts.
      temperature: T, dividing both sides' logits before the softmax.

    Returns:
      A float32 scalar: T^2 times the per-example KL, averaged over the real examples.
    """
    t = _teacher(teacher_logits) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    kl = _kl_rows(jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1))
    return temperature**2 * _masked_mean(kl, example_mask)


def logit_mse(
    student_logits: jax.Array, teacher_logits: jax.Array, example_mask: jax.Array | None = None
) -> jax.Array:
    """Mean squared error between logits (Tang et al.); also the regression-task KD loss."""
    diff = student_logits.astype(jnp.float32) - _teacher(teacher_logits)
    return _masked_mean(jnp.mean(jnp.square(diff), axis=-1), example_mask)


# ---------------------------------------------------------------------------------------------
# Hidden states and embeddings


def project(x: jax.Array, projection: jax.Array | None) -> jax.Array:
    """Student states mapped into the teacher's width by a learned (H_s, H_t) matrix."""
    x = x.astype(jnp.float32)
    return x if projection is None else x @ projection


def hidden_mse(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    token_mask: jax.Array,
    projection: jax.Array | None = None,
) -> jax.Array:
    """TinyBERT's MSE(H_s W, H_t) per real token, averaged over width and tokens.

    Used for layer outputs and (with its own projection) the embedding-layer output.

    Args:
      student_hidden: (B, L, H_s) student states.
      teacher_hidden: (B, L, H_t) teacher states; no gradient flows into them.
      token_mask: (B, L) marks the real tokens.
      projection: the learned (H_s, H_t) matrix W; None: the widths must be equal.

    Returns:
      A float32 scalar: the squared error averaged over the width, then over real tokens.
    """
    diff = project(student_hidden, projection) - _teacher(teacher_hidden)
    return _masked_mean(jnp.mean(jnp.square(diff), axis=-1), token_mask)


def hidden_cosine(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    token_mask: jax.Array,
    projection: jax.Array | None = None,
) -> jax.Array:
    """DistilBERT's cosine loss: mean over real tokens of 1 - cos(h_s, h_t)."""
    s = project(student_hidden, projection)
    t = _teacher(teacher_hidden)
    cos = jnp.sum(s * t, -1) / jnp.maximum(
        jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-8
    )
    return _masked_mean(1.0 - cos, token_mask)


def patient_loss(
    student_cls: Sequence[jax.Array],
    teacher_cls: Sequence[jax.Array],
    example_mask: jax.Array | None = None,
    projection: jax.Array | None = None,
) -> jax.Array:
    """BERT-PKD: squared distance of L2-normalised [CLS] states, summed over mapped layers."""
    if len(student_cls) != len(teacher_cls):
        raise ValueError(f"{len(student_cls)} student vs {len(teacher_cls)} teacher layers")
    total = jnp.zeros((), jnp.float32)
    for s, t in zip(student_cls, teacher_cls, strict=True):
        s = project(s, projection)
        t = _teacher(t)
        s = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-8)
        t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-8)
        total += _masked_mean(jnp.sum(jnp.square(s - t), -1), example_mask)
    return total


# ---------------------------------------------------------------------------------------------
# Attention and self-relations


def attention_kl(
    student_probs: jax.Array, teacher_probs: jax.Array, token_mask: jax.Array
) -> jax.Array:
    """KL(teacher || student) of each head's attention rows (B, N, L, L), averaged over heads
    and real query tokens (TinyBERT/MobileBERT/MiniLM attention transfer). Needs equal heads.

    Args:
      student_probs: (B, N, L, L) student attention probabilities (after the softmax).
      teacher_probs: the teacher's, of the same shape; no gradient flows into them.
      token_mask: (B, L) marks the real tokens; padded query rows do not count.

    Returns:
      A float32 scalar: the KL summed over keys, averaged over heads, then over real queries.

    Raises:
      ValueError: the student's and the teacher's shapes differ (head count or length).
    """
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(
            f"attention KL needs equal head counts and lengths: student {student_probs.shape}, "
            f"teacher {teacher_probs.shape}; use relation heads (MiniLMv2) instead"
        )
    log_t = jnp.log(jnp.maximum(_teacher(teacher_probs), 1e-30))
    log_s = jnp.log(jnp.maximum(student_probs.astype(jnp.float32), 1e-30))
    kl = _kl_rows(log_t, log_s)  # (B, N, L); masked keys carry ~1e-30 mass: no contribution
    return _masked_mean(jnp.mean(kl, axis=1), token_mask)


def self_relation(x: jax.Array, num_heads: int, token_mask: jax.Array) -> jax.Array:
    """MiniLM's relation: per head, log softmax(x x^T / sqrt(d)) over real keys; (B, R, L, L).

    `x` is (B, L, W) with W split into `num_heads` heads of W / num_heads, so teacher and
    student may differ in width and head count as long as both split into `num_heads`.
    """
    b, length, width = x.shape
    if width % num_heads:
        raise ValueError(f"width {width} does not split into {num_heads} relation heads")
    d = width // num_heads
    heads = x.astype(jnp.float32).reshape(b, length, num_heads, d)
    scores = jnp.einsum("blrd,bmrd->brlm", heads, heads) / np.sqrt(d)
    keys = token_mask[:, None, None, :] > 0
    # A large finite mask value keeps all-padding rows finite (uniform) in value and gradient.
    return jax.nn.log_softmax(jnp.where(keys, scores, -1e9), axis=-1)


def relation_kl(
    student_x: jax.Array, teacher_x: jax.Array, num_heads: int, token_mask: jax.Array
) -> jax.Array:
    """KL between teacher and student self-relations of the same `num_heads` (MiniLM's value
    relation; with queries and keys, MiniLMv2's Q-Q and K-K relations)."""
    t = self_relation(_teacher(teacher_x), num_heads, token_mask)
    s = self_relation(student_x, num_heads, token_mask)
    kl = _kl_rows(t, s)  # (B, R, L)
    return _masked_mean(jnp.mean(kl, axis=1), token_mask)


# ---------------------------------------------------------------------------------------------
# Layer maps


def layer_map(
    strategy: str | Sequence[int], student_layers: int, teacher_layers: int, k: int | None = None
) -> tuple[int, ...]:
    """The teacher layer (1-based; 0 is the embedding output) each student layer 1..M learns
    from: "uniform" (TinyBERT's m * N / M), "skip" (every k-th: m * k, k defaulting to
    N // M), "last" (the top M teacher layers, BERT-PKD-Last) or an explicit sequence."""
    m, n = student_layers, teacher_layers
    if isinstance(strategy, str):
        if strategy == "uniform":
            mapping = tuple(int(round(i * n / m)) for i in range(1, m + 1))
        elif strategy == "skip":
            step = k or n // m
            mapping = tuple(i * step for i in range(1, m + 1))
        elif strategy == "last":
            mapping = tuple(range(n - m + 1, n + 1))
        else:
            raise ValueError(f"layer map {strategy!r}: use 'uniform', 'skip', 'last' or a list")
    else:
        mapping = tuple(int(i) for i in strategy)
    if len(mapping) != m:
        raise ValueError(f"layer map {mapping} has {len(mapping)} entries for {m} student layers")
    if any(not 1 <= t <= n for t in mapping):
        raise ValueError(f"layer map {mapping} names teacher layers outside 1..{n}")
    return mapping
