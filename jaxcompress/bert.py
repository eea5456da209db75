"""BERT's names: model, HF checkpoints, structured pruning, rule presets, structure transforms."""

from jaxcompress.compress.prune.structured import head_importance, prune_ffn, prune_heads, shrink
from jaxcompress.compress.transforms import (
    factorize_embeddings,
    keep_layers,
    low_rank,
    share_layers,
    shrink_width,
)
from jaxcompress.models.bert import Bert, BertConfig, init_params
from jaxcompress.models.bert_rules import EMBEDDINGS, KERNELS, LOW_RANK_TARGETS, weight_rules
from jaxcompress.models.hf import load_pretrained, save_pretrained

__all__ = [
    "EMBEDDINGS",
    "KERNELS",
    "LOW_RANK_TARGETS",
    "Bert",
    "BertConfig",
    "factorize_embeddings",
    "head_importance",
    "init_params",
    "keep_layers",
    "load_pretrained",
    "low_rank",
    "prune_ffn",
    "prune_heads",
    "save_pretrained",
    "share_layers",
    "shrink",
    "shrink_width",
    "weight_rules",
]
