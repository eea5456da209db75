"""PoWER-BERT word-vector elimination: keep each layer's most-attended tokens for what follows."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxcompress.models.bert import BertConfig

# ceil(fraction * length) forgives this much float noise (0.3 * 10 is 3.0000000000000004).
_CEIL_SLACK = 1e-6


def kept_counts(token_keep: Sequence[float], length: int) -> tuple[int, ...]:
    """Per layer, how many word vectors it keeps of a padded input of `length`:
    max(1, ceil(fraction * length)); static, so one compiled shape per input length."""
    return tuple(max(1, math.ceil(f * length - _CEIL_SLACK)) for f in token_keep)


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


def retention_from_attention(
    config: BertConfig,
    params: dict,
    batches: Iterable[Mapping[str, np.ndarray]],
    keep_mass: float,
) -> tuple[float, ...]:
    """A `token_keep` from data: per layer, the smallest fraction of tokens whose attention
    mass (each example's sorted masses over its total, averaged over examples) covers
    `keep_mass` of the whole, then made non-increasing over layers.

    Runs the full model (no elimination). Fractions are of the longest padded length among
    the batches: a shorter batch counts as padded to it, which changes no real position.
    Rows without a real token (batch padding) are skipped.
    """
    from jaxcompress.models.bert import Bert  # bert.py imports this module

    if not 0.0 < keep_mass <= 1.0:
        raise ValueError(f"keep_mass={keep_mass}; expected 0 < keep_mass <= 1")
    full = config.replace(token_keep=None)

    @jax.jit
    def sorted_masses(params, batch):  # params an argument, not constants baked into the program
        out = Bert(full).apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            output_attentions=True,
        )
        mask_BxL = batch["attention_mask"] > 0
        mass_NxBxL = jnp.stack([attention_mass(p, mask_BxL) for p in out.attentions])
        total_NxBx1 = jnp.maximum(mass_NxBxL.sum(-1, keepdims=True), 1e-30)
        return -jnp.sort(-mass_NxBxL / total_NxBx1, axis=-1)  # descending

    curves, length = [], 0
    for batch in batches:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        arrays = {k: jnp.asarray(batch[k]) for k in keys if k in batch}
        real = np.asarray(batch["attention_mask"]).sum(-1) > 0
        curves.append(np.asarray(sorted_masses(params, arrays))[:, real])
        length = max(length, arrays["input_ids"].shape[1])
    if not curves or not sum(c.shape[1] for c in curves):
        raise ValueError("retention_from_attention needs at least one example with a token")
    padded = [np.pad(c, ((0, 0), (0, 0), (0, length - c.shape[-1]))) for c in curves]
    coverage_NxL = np.cumsum(np.concatenate(padded, axis=1).mean(1), axis=-1)
    counts = 1 + np.argmax(coverage_NxL >= keep_mass - _CEIL_SLACK, axis=-1)
    counts = np.where(coverage_NxL[:, -1] >= keep_mass - _CEIL_SLACK, counts, length)
    return tuple(float(f) for f in np.minimum.accumulate(counts / length))
