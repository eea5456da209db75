"""Knowledge distillation losses over model outputs; the teacher is another (config, params)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(per_example: jax.Array, example_mask: jax.Array) -> jax.Array:
    return jnp.sum(per_example * example_mask) / jnp.maximum(jnp.sum(example_mask), 1.0)


def soft_cross_entropy(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    example_mask: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """KL(teacher || student) of temperature-softened distributions, times T^2 (Hinton et al.).

    Zero exactly when the student's logits equal the teacher's (up to a per-example shift).
    """
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    p_teacher = jax.nn.softmax(t, axis=-1)
    kl = jnp.sum(p_teacher * (jax.nn.log_softmax(t, -1) - jax.nn.log_softmax(s, -1)), axis=-1)
    return temperature**2 * _masked_mean(kl, example_mask)


def logit_mse(
    student_logits: jax.Array, teacher_logits: jax.Array, example_mask: jax.Array
) -> jax.Array:
    """Mean squared error between logits (Tang et al.); also the regression-task KD loss."""
    diff = student_logits.astype(jnp.float32) - jax.lax.stop_gradient(teacher_logits)
    return _masked_mean(jnp.mean(jnp.square(diff), axis=-1), example_mask)
