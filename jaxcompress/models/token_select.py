"""Token selection in BERT's forward pass (PoWER-BERT): kept counts, word-vector elimination."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# ceil(fraction * length) forgives this much float noise (0.3 * 10 is 3.0000000000000004).
CEIL_SLACK = 1e-6


def kept_counts(token_keep: Sequence[float], length: int) -> tuple[int, ...]:
    """Per layer, how many word vectors it keeps of a padded input of `length`:
    max(1, ceil(fraction * length)); static, so one compiled shape per input length."""
    return tuple(max(1, math.ceil(f * length - CEIL_SLACK)) for f in token_keep)


def mask_from_bias(bias_Bx1x1xL: jax.Array) -> jax.Array:
    """The key mask (True = real token) of the model's additive attention bias."""
    return bias_Bx1x1xL[:, 0, 0, :] == 0


def bias_from_mask(mask_BxL: jax.Array) -> jax.Array:
    """The model's attention bias: 0 where a key is real, float32 min where it is padding."""
    neg = jnp.finfo(jnp.float32).min
    return jnp.where(mask_BxL[:, None, None, :], 0.0, neg).astype(jnp.float32)


def attention_mass(probs_BxNxLxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """The attention each word vector receives, summed over heads and real query positions
    (B, L); zero for padding keys, which get no attention."""
    queries = mask_BxL.astype(jnp.float32)[:, None, :, None]
    return (probs_BxNxLxL.astype(jnp.float32) * queries).sum((1, 2)) * mask_BxL


def significance(probs_BxNxLxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """PoWER-BERT's significance score (B, L): the attention mass, with +inf at [CLS]
    (position 0, always kept) and -inf at padding (never kept before a real token)."""
    mass = attention_mass(probs_BxNxLxL, mask_BxL)
    scores = jnp.where(mask_BxL, mass, -jnp.inf)
    return scores.at[:, 0].set(jnp.inf)


def keep_tokens(
    x_BxLxH: jax.Array, mask_BxL: jax.Array, scores_BxL: jax.Array, count: int
) -> tuple[jax.Array, jax.Array]:
    """The `count` highest-scoring word vectors and their mask, in their original order."""
    _, top_BxK = jax.lax.top_k(scores_BxL, count)
    index_BxK = jnp.sort(top_BxK, axis=-1)
    x_BxKxH = jnp.take_along_axis(x_BxLxH, index_BxK[:, :, None], axis=1)
    return x_BxKxH, jnp.take_along_axis(mask_BxL, index_BxK, axis=1)


def eliminate(
    x_BxLxH: jax.Array, bias_Bx1x1xL: jax.Array, probs_BxNxLxL: jax.Array, count: int
) -> tuple[jax.Array, jax.Array]:
    """One extract layer: keep the `count` most significant vectors of `x` by this layer's
    attention `probs`; returns them and the attention bias of what is kept. The selection
    passes no gradient (the gathered vectors do)."""
    mask_BxL = mask_from_bias(bias_Bx1x1xL)
    scores_BxL = significance(jax.lax.stop_gradient(probs_BxNxLxL), mask_BxL)
    x_BxKxH, mask_BxK = keep_tokens(x_BxLxH, mask_BxL, scores_BxL, count)
    return x_BxKxH, bias_from_mask(mask_BxK)
