"""PoWER-BERT word-vector elimination: keep each layer's most-attended tokens for what follows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.models.bert import Bert, BertConfig
from jaxcompress.models.token_select import (
    CEIL_SLACK,
    attention_mass,
    bias_from_mask,
    eliminate,
    keep_tokens,
    kept_counts,
    mask_from_bias,
    significance,
)

# The selection itself runs inside BERT's forward pass (models/token_select.py); this module
# is PoWER-BERT's public face: those functions and the retention configuration from data.
__all__ = [
    "attention_mass",
    "bias_from_mask",
    "eliminate",
    "keep_tokens",
    "kept_counts",
    "mask_from_bias",
    "retention_from_attention",
    "significance",
]


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
    counts = 1 + np.argmax(coverage_NxL >= keep_mass - CEIL_SLACK, axis=-1)
    counts = np.where(coverage_NxL[:, -1] >= keep_mass - CEIL_SLACK, counts, length)
    return tuple(float(f) for f in np.minimum.accumulate(counts / length))
