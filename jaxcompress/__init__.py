"""jaxcompress: compression of BERT-style Transformers as pure transforms over parameter trees.

The names below are the public API for other JAX projects: transforms that take any
parameter tree addressed by path rules (`core`), and the model, training and recipe entry
points of this package. Submodules hold the rest; names that are also submodules are not
re-exported (`jaxcompress.qat.qat`, `jaxcompress.quantize.quantize`), so that
`from jaxcompress import qat` keeps meaning the module.
"""

from jaxcompress.core import (
    Reparam,
    chain,
    compose,
    identity,
    leaf_paths,
    map_rules,
    match_rules,
)
from jaxcompress.distill import attention_kl, hidden_mse, soft_cross_entropy
from jaxcompress.factorize import LowRank, low_rank_params, svd_factors
from jaxcompress.gobo import GoboSpec, gobo_dequantize, gobo_quantize
from jaxcompress.hessian import assign_bits, hutchinson_trace
from jaxcompress.models.bert import Bert, BertConfig
from jaxcompress.models.hf import load_pretrained, save_pretrained
from jaxcompress.prune import (
    Schedule,
    add_movement_scores,
    keep_pruned_zero,
    magnitude_pruning,
    movement_pruning,
    rewind,
)
from jaxcompress.qat import add_binary_split, add_lsq_steps
from jaxcompress.quantize import QuantSpec, dequantize, fake_quant, ternary_split
from jaxcompress.structured import head_importance, prune_ffn, prune_heads, shrink

__all__ = [
    "Bert",
    "BertConfig",
    "GoboSpec",
    "LowRank",
    "QuantSpec",
    "Reparam",
    "Schedule",
    "add_binary_split",
    "add_lsq_steps",
    "add_movement_scores",
    "assign_bits",
    "attention_kl",
    "chain",
    "compose",
    "dequantize",
    "fake_quant",
    "gobo_dequantize",
    "gobo_quantize",
    "head_importance",
    "hidden_mse",
    "hutchinson_trace",
    "identity",
    "keep_pruned_zero",
    "leaf_paths",
    "load_pretrained",
    "low_rank_params",
    "magnitude_pruning",
    "map_rules",
    "match_rules",
    "movement_pruning",
    "prune_ffn",
    "prune_heads",
    "rewind",
    "save_pretrained",
    "shrink",
    "soft_cross_entropy",
    "svd_factors",
    "ternary_split",
]
