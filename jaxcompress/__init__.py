"""jaxcompress: compression of BERT-style Transformers as pure transforms over parameter trees.

The names below are the model-agnostic public API for other JAX projects, transforms that
take any parameter tree addressed by path rules (`core`): rules and reparams with the optax
wrapper, quantizers and QAT, int8 and fp8 execution of dense layers, pruning, low rank,
sharing and distillation losses. BERT's names (the model and its config, Hugging Face
loading and saving, head and FFN pruning, its rule presets and structure transforms) are in
`jaxcompress.bert`. Submodules hold the rest; names that are also submodules are not
re-exported (`jaxcompress.compress.quant.qat.qat`), and no public name is called like a
subpackage or module (`models`, `data`, `compress`, `train`, `experiments`, `bert`), so that
`from jaxcompress import train` keeps meaning the subpackage.
"""

from jaxcompress.compress.distill.losses import attention_kl, hidden_mse, soft_cross_entropy
from jaxcompress.compress.factorize import LowRank, densify, low_rank_params, svd_factors
from jaxcompress.compress.gradual_sharing import gradual_sharing as gradual_layer_sharing
from jaxcompress.compress.gradual_sharing import load_tied, save_tied
from jaxcompress.compress.intercept import low_rank_layers, use_low_rank
from jaxcompress.compress.prune.sparse import load as load_sparse
from jaxcompress.compress.prune.sparse import save as save_sparse
from jaxcompress.compress.prune.sparse import sparse_bytes
from jaxcompress.compress.prune.unstructured import (
    Schedule,
    add_movement_scores,
    magnitude_pruning,
    movement_pruning,
    rewind,
)
from jaxcompress.compress.quant.activations import calibrate, quantized_inputs
from jaxcompress.compress.quant.gobo import GoboSpec, gobo_dequantize, gobo_quantize
from jaxcompress.compress.quant.hessian import assign_bits, hutchinson_trace
from jaxcompress.compress.quant.int8 import (
    IntegerModel,
    fp8_dense,
    fp8_weights,
    int8_dense,
    int8_weights,
    integer_dense_layers,
)
from jaxcompress.compress.quant.pack import load as load_packed
from jaxcompress.compress.quant.pack import packed_bytes
from jaxcompress.compress.quant.pack import save as save_packed
from jaxcompress.compress.quant.qat import add_binary_split, add_lsq_steps
from jaxcompress.compress.quant.qat import default_rules as kernel_rules
from jaxcompress.compress.quant.qat import qat as weight_quantization
from jaxcompress.compress.quant.quantizers import QuantSpec, dequantize, fake_quant, ternary_split
from jaxcompress.compress.share import expand, tie, tying
from jaxcompress.core import (
    Reparam,
    chain,
    compose,
    finalize,
    identity,
    leaf_paths,
    map_rules,
    match_rules,
    reparam_apply,
    with_reparam,
)

__all__ = [
    "GoboSpec",
    "IntegerModel",
    "LowRank",
    "QuantSpec",
    "Reparam",
    "Schedule",
    "add_binary_split",
    "add_lsq_steps",
    "add_movement_scores",
    "assign_bits",
    "attention_kl",
    "calibrate",
    "chain",
    "compose",
    "densify",
    "dequantize",
    "expand",
    "fake_quant",
    "finalize",
    "fp8_dense",
    "fp8_weights",
    "gobo_dequantize",
    "gobo_quantize",
    "gradual_layer_sharing",
    "hidden_mse",
    "hutchinson_trace",
    "identity",
    "int8_dense",
    "int8_weights",
    "integer_dense_layers",
    "kernel_rules",
    "leaf_paths",
    "load_packed",
    "load_sparse",
    "load_tied",
    "low_rank_layers",
    "low_rank_params",
    "magnitude_pruning",
    "map_rules",
    "match_rules",
    "movement_pruning",
    "packed_bytes",
    "quantized_inputs",
    "reparam_apply",
    "rewind",
    "save_packed",
    "save_sparse",
    "save_tied",
    "soft_cross_entropy",
    "sparse_bytes",
    "svd_factors",
    "ternary_split",
    "tie",
    "tying",
    "use_low_rank",
    "weight_quantization",
    "with_reparam",
]
