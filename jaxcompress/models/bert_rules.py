"""BERT's parameter paths and rule presets, for the generic transforms of `jaxcompress.compress`."""

from __future__ import annotations

from typing import TypeVar

Spec = TypeVar("Spec")

LAYER_PREFIX = "bert/encoder/layer/"  # + '<layer or shared group>/...'
WORD_EMBEDDINGS = "bert/embeddings/word_embeddings"
EMBEDDING_PROJECTION = "bert/embeddings/embedding_projection"  # ALBERT's E x H matrix
EMBEDDINGS = r"bert/embeddings/(word|position|token_type)_embeddings"  # the lookup tables
# Every dense kernel (low-rank factors included) and ALBERT's embedding projection.
KERNELS = rf".*/(kernel|kernel_a|kernel_b)|{EMBEDDING_PROJECTION}"
# The dense kernels each `target` of the `low_rank` transform names.
LOW_RANK_TARGETS = {
    "ffn": r"bert/encoder/layer/\d+/(intermediate|output)/dense/kernel",
    "attention": r"bert/encoder/layer/\d+/attention/(self/(query|key|value)|output/dense)/kernel",
    "all": r"bert/encoder/layer/\d+/.*/kernel",
}


def weight_rules(kernels: Spec | None, embeddings: Spec | None) -> list[tuple[str, Spec | None]]:
    """Rules giving BERT's dense kernels and embedding tables a per-weight spec each.

    Args:
      kernels: the spec of every dense kernel (low-rank factors and ALBERT's projection
        included), e.g. a `QuantSpec` or `GoboSpec`; None leaves them float.
      embeddings: the spec of the word, position and token-type tables; None leaves them float.

    Returns:
      Rules for `core.match_rules`; LayerNorm parameters and biases stay float.
    """
    return [(EMBEDDINGS, embeddings), (KERNELS, kernels), (".*", None)]
