"""BertConfig: the shape and behaviour of a (possibly compressed) BERT."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# BertConfig fields that describe a shape Hugging Face's BertConfig cannot (head_size aside).
COMPRESSED_FIELDS = (
    "heads_per_layer",
    "intermediate_per_layer",
    "embedding_size",
    "attention_groups",
    "ffn_groups",
    "low_rank",
)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape and behaviour of a (possibly compressed) BERT.

    The first block mirrors Hugging Face's `BertConfig`; the second block says how a
    compressed model departs from the uniform shape. `None` means "uniform / absent".
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # Task head: 0 = encoder only, 1 = regression, >1 = classification.
    num_labels: int = 0
    # Compressed shapes.
    head_size: int | None = None  # per-head width; defaults to hidden_size // num_attention_heads
    heads_per_layer: tuple[int, ...] | None = None  # after head pruning
    intermediate_per_layer: tuple[int, ...] | None = None  # after FFN-neuron pruning
    embedding_size: int | None = None  # ALBERT factorized embedding E (V x E then E x H)
    # Cross-layer sharing: layer -> parameter group of its attention block and of its FFN block.
    # Group g's parameters live under encoder/layer/g. `None` means no sharing.
    attention_groups: tuple[int, ...] | None = None
    ffn_groups: tuple[int, ...] | None = None
    # Low-rank dense layers: (module path, rank), e.g. ("bert/encoder/layer/0/output/dense", 96).
    low_rank: tuple[tuple[str, int], ...] = ()
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # LayerDrop (Fan et al. 2019): in training, each layer is skipped for the whole batch with
    # this probability (the 'dropout' rng); evaluation runs every layer. Not a shape.
    layerdrop: float = 0.0
    # Recompute each layer's activations in the backward pass instead of keeping them
    # (less memory, about a third more compute). Not a shape.
    remat: bool = False
    # PoWER-BERT (Goyal et al. 2020): per layer, the fraction of the padded input length whose
    # word vectors (the most attended, [CLS] always) it keeps for its FFN and every later
    # layer; non-increasing. Counts are max(1, ceil(fraction * L)). Not a shape.
    token_keep: tuple[float, ...] | None = None
    # Run a uniform, unshared stack (no pruned sizes, sharing, low rank or token selection)
    # as one `nn.scan` over its layers, stacked on the fly from the per-layer parameters
    # that stay the stored form: jit compiles one layer instead of each. Inside the scan
    # every layer's module path is `.../layer/scan/...`. Not a shape.
    scan_layers: bool = False

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        names = ("heads_per_layer", "intermediate_per_layer", "attention_groups", "ffn_groups")
        for name in names:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
                if len(getattr(self, name)) != n:
                    raise ValueError(f"BertConfig.{name} has {len(value)} entries, expected {n}")
        object.__setattr__(self, "low_rank", tuple((str(p), int(r)) for p, r in self.low_rank))
        if not 0.0 <= self.layerdrop < 1.0:
            raise ValueError(f"BertConfig.layerdrop={self.layerdrop}; expected 0 <= p < 1")
        if self.token_keep is not None:
            keep = tuple(float(f) for f in self.token_keep)
            object.__setattr__(self, "token_keep", keep)
            if len(keep) != n:
                raise ValueError(f"BertConfig.token_keep has {len(keep)} entries, expected {n}")
            if not all(0.0 < f <= 1.0 for f in keep):
                raise ValueError(f"BertConfig.token_keep={keep}; expected fractions in (0, 1]")
            if any(b > a for a, b in zip(keep, keep[1:], strict=False)):
                raise ValueError(f"BertConfig.token_keep={keep} must be non-increasing")
            if self.layerdrop > 0:
                raise ValueError("BertConfig.token_keep cannot be combined with layerdrop > 0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"BertConfig.dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}")
        if self.head_size is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}; set head_size"
            )
        for kind, size_of in (("attention", self.layer_heads), ("ffn", self.layer_intermediate)):
            groups = getattr(self, f"{kind}_groups")
            if groups is None:
                continue
            if any(g < 0 or g >= n for g in groups):
                raise ValueError(f"{kind}_groups {groups} must name groups in 0..{n - 1}")
            for layer, group in enumerate(groups):
                first = groups.index(group)
                if size_of(layer) != size_of(first):
                    raise ValueError(
                        f"layers {first} and {layer} share {kind} group {group} but differ in size"
                    )

    @property
    def attention_head_size(self) -> int:
        return self.head_size or self.hidden_size // self.num_attention_heads

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    def layer_heads(self, layer: int) -> int:
        return self.heads_per_layer[layer] if self.heads_per_layer else self.num_attention_heads

    def layer_intermediate(self, layer: int) -> int:
        if self.intermediate_per_layer:
            return self.intermediate_per_layer[layer]
        return self.intermediate_size

    def attention_group(self, layer: int) -> int:
        return self.attention_groups[layer] if self.attention_groups else layer

    def ffn_group(self, layer: int) -> int:
        return self.ffn_groups[layer] if self.ffn_groups else layer

    def rank_of(self, module_path: str) -> int | None:
        return dict(self.low_rank).get(module_path)

    def compressed_fields(self) -> tuple[str, ...]:
        """The compressed-shape fields that are set (head_size aside)."""
        return tuple(name for name in COMPRESSED_FIELDS if getattr(self, name))

    @property
    def is_uniform(self) -> bool:
        """Whether Hugging Face's BertConfig can express this shape exactly."""
        heads_fill_width = self.attention_head_size * self.num_attention_heads == self.hidden_size
        return heads_fill_width and not self.compressed_fields()

    def replace(self, **changes: Any) -> BertConfig:
        return dataclasses.replace(self, **changes)
