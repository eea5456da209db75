"""BERT in Flax linen, with a config that can express every compressed shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.models import token_select
from jaxcompress.models.bert_config import BertConfig

# Logical axis names carried by every parameter; sharding rules map them to mesh axes.
VOCAB, EMBED, HIDDEN, QKV, MLP, RANK, CLASSES, POSITIONS, TYPES = (
    "vocab",
    "embed",
    "hidden",
    "qkv",
    "mlp",
    "rank",
    "classes",
    "positions",
    "types",
)
# Logical axis names of the hidden states between layers (sharding.RULES split the batch).
BATCH, LENGTH, ACTIVATION_EMBED = "batch", "length", "activation_embed"


@struct.dataclass
class BertOutput:
    """What the model returns; hidden states and attentions only when asked for."""

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    logits: jax.Array | None = None
    # Embeddings output, then each layer. With `token_keep`, layer i's output and
    # last_hidden_state hold only its kept vectors (B, k_i, H), in their original order.
    hidden_states: tuple[jax.Array, ...] | None = None
    # (B, heads, L_i, L_i) per layer, L_i its input length (L, then k_{i-1} with token_keep).
    attentions: tuple[jax.Array, ...] | None = None


def _init(config: BertConfig, axes: Sequence[str]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(
        nn.initializers.normal(stddev=config.initializer_range), tuple(axes)
    )


def _zeros(axes: Sequence[str]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


def _ones(axes: Sequence[str]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(axes))


class Linear(nn.Module):
    """HF `nn.Linear`; runs as two factors x @ kernel_a @ kernel_b when the config gives a rank.

    Widths may be zero (every head or neuron pruned): the product is then zero and only the
    bias remains, which is exactly what the pruned parent computes.
    """

    config: BertConfig
    features: int
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.config.compute_dtype
        rank = cfg.rank_of("/".join(self.scope.path))
        n_in = x.shape[-1]
        if rank is None:
            kernel = self.param("kernel", _init(cfg, self.axes), (n_in, self.features))
            y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        else:
            a = self.param("kernel_a", _init(cfg, (self.axes[0], RANK)), (n_in, rank))
            b = self.param("kernel_b", _init(cfg, (RANK, self.axes[1])), (rank, self.features))
            y = jnp.dot(jnp.dot(x.astype(dtype), a.astype(dtype)), b.astype(dtype))
        bias = self.param("bias", _zeros(self.axes[1:]), (self.features,))
        return y + bias.astype(dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.shape[-1]
        scale = self.param("scale", _ones((EMBED,)), (h,))
        bias = self.param("bias", _zeros((EMBED,)), (h,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.config.layer_norm_eps) * scale + bias
        return y.astype(self.config.compute_dtype)


def activation(name: str):
    """The HF `hidden_act` by name."""
    table = {
        "gelu": lambda x: nn.gelu(x, approximate=False),
        "gelu_new": lambda x: nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
        "relu": nn.relu,
        "silu": nn.silu,
        "swish": nn.silu,
        "tanh": jnp.tanh,
    }
    if name not in table:
        raise ValueError(f"hidden_act {name!r} not supported; expected one of {sorted(table)}")
    return table[name]


def constrain_hidden(x_BxLxH: jax.Array) -> jax.Array:
    """Hidden states as the logical axis rules in force say (unchanged when none are)."""
    return nn.with_logical_constraint(x_BxLxH, (BATCH, LENGTH, ACTIVATION_EMBED))


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids_BxL, token_type_ids_BxL, deterministic: bool) -> jax.Array:
        cfg = self.config
        factorized = cfg.embedding_size is not None
        e = cfg.embedding_size if factorized else cfg.hidden_size
        word_axes = (VOCAB, RANK if factorized else EMBED)
        word = self.param("word_embeddings", _init(cfg, word_axes), (cfg.vocab_size, e))
        x_BxLxH = jnp.take(word, input_ids_BxL, axis=0)
        if factorized:  # ALBERT: V x E lookup, then E x H projection
            proj = self.param(
                "embedding_projection", _init(cfg, (RANK, EMBED)), (e, cfg.hidden_size)
            )
            x_BxLxH = jnp.dot(x_BxLxH, proj)
        pos_shape = (cfg.max_position_embeddings, cfg.hidden_size)
        pos = self.param("position_embeddings", _init(cfg, (POSITIONS, EMBED)), pos_shape)
        types_shape = (cfg.type_vocab_size, cfg.hidden_size)
        types = self.param("token_type_embeddings", _init(cfg, (TYPES, EMBED)), types_shape)
        length = input_ids_BxL.shape[1]
        x_BxLxH = x_BxLxH + pos[None, :length] + jnp.take(types, token_type_ids_BxL, axis=0)
        x_BxLxH = LayerNorm(cfg, name="LayerNorm")(x_BxLxH)
        x_BxLxH = nn.Dropout(cfg.hidden_dropout_prob)(x_BxLxH, deterministic=deterministic)
        return constrain_hidden(x_BxLxH)


class SelfAttention(nn.Module):
    """Multi-head self-attention. `fused`: through `jax.nn.dot_product_attention` (cuDNN
    flash attention on GPU, XLA elsewhere), which returns no probabilities (None) and has no
    attention dropout; otherwise explicit, with its probabilities."""

    config: BertConfig
    heads: int
    fused: bool = False

    @nn.compact
    def __call__(self, x_BxLxH, bias_Bx1x1xL, deterministic: bool):
        cfg, d = self.config, self.config.attention_head_size
        b, length = x_BxLxH.shape[:2]

        def project(name: str) -> jax.Array:
            y = Linear(cfg, self.heads * d, (EMBED, QKV), name=name)(x_BxLxH)
            return y.reshape(b, length, self.heads, d)

        q_BxLxNxD, k_BxLxNxD, v_BxLxNxD = project("query"), project("key"), project("value")
        # Kept only when applied with mutable=["intermediates"] (self-relation distillation).
        for name, t in (("queries", q_BxLxNxD), ("keys", k_BxLxNxD), ("values", v_BxLxNxD)):
            self.sow("intermediates", name, t.reshape(b, length, self.heads * d))
        if self.fused and self.heads > 0:  # a layer with every head pruned stays explicit
            keep_Bx1x1xL = bias_Bx1x1xL == 0  # the padding mask the bias encodes
            # A padding row (no real key) attends to every key, so that no kernel sees a
            # fully masked row (cuDNN may return NaN there); its output is never used.
            keep_Bx1x1xL = keep_Bx1x1xL | ~keep_Bx1x1xL.any(-1, keepdims=True)
            ctx_BxLxNxD = jax.nn.dot_product_attention(
                q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask=keep_Bx1x1xL, scale=1.0 / d**0.5
            )
            return ctx_BxLxNxD.reshape(b, length, self.heads * d), None
        scores_BxNxLxL = jnp.einsum("blnd,bmnd->bnlm", q_BxLxNxD, k_BxLxNxD) / jnp.sqrt(d)
        probs_BxNxLxL = jax.nn.softmax(scores_BxNxLxL.astype(jnp.float32) + bias_Bx1x1xL, -1)
        drop = nn.Dropout(cfg.attention_probs_dropout_prob)
        dropped = drop(probs_BxNxLxL, deterministic=deterministic).astype(v_BxLxNxD.dtype)
        ctx_BxLxNxD = jnp.einsum("bnlm,bmnd->blnd", dropped, v_BxLxNxD)
        return ctx_BxLxNxD.reshape(b, length, self.heads * d), probs_BxNxLxL


class AddNorm(nn.Module):
    """HF's `*Output` blocks: dense, dropout, residual add, LayerNorm."""

    config: BertConfig
    in_axis: str

    @nn.compact
    def __call__(self, h, residual, deterministic: bool):
        cfg = self.config
        y = Linear(cfg, cfg.hidden_size, (self.in_axis, EMBED), name="dense")(h)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        return LayerNorm(cfg, name="LayerNorm")(y + residual)


class AttentionBlock(nn.Module):
    config: BertConfig
    heads: int
    fused: bool = False

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        attention = SelfAttention(self.config, self.heads, self.fused, name="self")
        ctx, probs = attention(x, bias, deterministic)
        return AddNorm(self.config, QKV, name="output")(ctx, x, deterministic), probs


class Intermediate(nn.Module):
    config: BertConfig
    width: int

    @nn.compact
    def __call__(self, x):
        h = Linear(self.config, self.width, (EMBED, MLP), name="dense")(x)
        return activation(self.config.hidden_act)(h)


def _layerdrop(skip: jax.Array | None, x: jax.Array, y: jax.Array, probs: jax.Array):
    """The layer's output `y` and attentions, or, where `skip` is true, its input `x`
    unchanged and attentions that pass no gradient back: a skipped layer gets no gradient."""
    if skip is None:
        return y, probs
    if probs is None:  # fused attention keeps no probabilities
        return jnp.where(skip, x, y), None
    return jnp.where(skip, x, y), jnp.where(skip, jax.lax.stop_gradient(probs), probs)


class Layer(nn.Module):
    """One encoder layer: `attend` and `feed_forward` can be called on different instances,
    which is how attention-only or FFN-only sharing reuses one group's half of a layer.

    Returns `(x, (x, probs))` so that `nn.scan` can stack hidden states and attentions;
    a true `skip` (LayerDrop) makes the layer the identity. `fused` attention returns None
    for probs.
    """

    config: BertConfig
    heads: int
    width: int
    deterministic: bool
    fused: bool = False

    def setup(self):
        cfg = self.config
        self.attention = AttentionBlock(cfg, self.heads, self.fused)
        self.intermediate = Intermediate(cfg, self.width)
        self.output = AddNorm(cfg, MLP)

    def attend(self, x, bias):
        return self.attention(x, bias, self.deterministic)

    def feed_forward(self, x):
        return constrain_hidden(self.output(self.intermediate(x), x, self.deterministic))

    def __call__(self, x, bias, skip=None):
        y, probs = self.attend(x, bias)
        x, probs = _layerdrop(skip, x, self.feed_forward(y), probs)
        return x, (x, probs)


def _consecutive_runs(groups: Sequence[int]) -> list[tuple[int, int]] | None:
    """(group, repeats) per run if every group occupies one contiguous run, else None."""
    runs: list[tuple[int, int]] = []
    for g in groups:
        if runs and runs[-1][0] == g:
            runs[-1] = (g, runs[-1][1] + 1)
        elif any(g == seen for seen, _ in runs):
            return None
        else:
            runs.append((g, 1))
    return runs


class LayerStack(nn.Module):
    """HF's `encoder.layer`, with cross-layer sharing.

    When whole layers are shared in contiguous runs (all layers one group, or every k
    consecutive layers a group), each run is an `nn.scan` over one set of parameters, so jit
    compiles the layer once per group instead of once per layer.

    LayerDrop draws one skip flag per layer from the 'dropout' rng when not deterministic;
    a skipped layer is computed and then discarded (`jnp.where`), so it saves no time.

    With `token_keep` (PoWER-BERT), each layer keeps its most significant word vectors between
    self-attention and the FFN, and later layers see only those; shared layers then run
    unrolled (same parameters as the scan), since every layer has its own length.

    Attention is fused (`jax.nn.dot_product_attention`) unless its probabilities are needed:
    `need_probs` (asked for by the caller), token selection, or attention dropout in training.
    """

    config: BertConfig
    deterministic: bool
    need_probs: bool = True

    @nn.compact
    def __call__(self, x, bias):
        cfg, n = self.config, self.config.num_hidden_layers
        fused = _use_fused(cfg, self.deterministic, self.need_probs)
        attention_groups = [cfg.attention_group(i) for i in range(n)]
        ffn_groups = [cfg.ffn_group(i) for i in range(n)]
        runs = _consecutive_runs(attention_groups) if attention_groups == ffn_groups else None
        hidden_states, attentions = [x], []
        layer_class = _layer_class(cfg)
        skips_N = _layerdrop_skips(self, cfg, self.deterministic)
        scannable = runs is not None and any(repeats > 1 for _, repeats in runs)
        if scannable and cfg.token_keep is None:
            start = 0
            for group, repeats in runs:
                layer = attention_groups.index(group)
                sizes = (cfg.layer_heads(layer), cfg.layer_intermediate(layer))
                skips = None if skips_N is None else skips_N[start : start + repeats]
                x, xs, probs = _scan(
                    cfg,
                    sizes,
                    self.deterministic,
                    fused,
                    x,
                    bias,
                    skips,
                    repeats,
                    shared=True,
                    name=str(group),
                )
                start += repeats
                hidden_states += xs
                attentions += probs
            return x, tuple(hidden_states), tuple(attentions)

        modules: dict[int, Layer] = {}

        def module(group: int, layer: int) -> Layer:
            if group not in modules:
                heads = (
                    cfg.layer_heads(attention_groups.index(group))
                    if group in attention_groups
                    else 0
                )
                width = (
                    cfg.layer_intermediate(ffn_groups.index(group)) if group in ffn_groups else 0
                )
                modules[group] = layer_class(
                    cfg, heads, width, self.deterministic, fused, name=str(group)
                )
            return modules[group]

        counts = None
        if cfg.token_keep is not None:
            counts = token_select.kept_counts(cfg.token_keep, x.shape[1])
        for i in range(n):
            y, probs = module(attention_groups[i], i).attend(x, bias)
            if counts is not None:
                y, bias = token_select.eliminate(y, bias, probs, counts[i])
            y = module(ffn_groups[i], i).feed_forward(y)
            x, probs = _layerdrop(None if skips_N is None else skips_N[i], x, y, probs)
            hidden_states.append(x)
            attentions.append(probs)
        return x, tuple(hidden_states), tuple(attentions)


def scans_every_layer(config: BertConfig) -> bool:
    """Whether `config` runs its encoder as one scan over per-layer parameters."""
    departs = config.compressed_fields() or config.token_keep is not None
    return config.scan_layers and not departs


def _use_fused(config: BertConfig, deterministic: bool, need_probs: bool) -> bool:
    dropout = not deterministic and config.attention_probs_dropout_prob > 0
    return not (need_probs or config.token_keep is not None or dropout)


def _layer_class(config: BertConfig) -> type[Layer]:
    if config.remat:
        return nn.remat(Layer, methods=["__call__", "attend", "feed_forward"])
    return Layer


def _layerdrop_skips(module: nn.Module, config: BertConfig, deterministic: bool):
    if deterministic or config.layerdrop <= 0:
        return None
    draw = module.make_rng("dropout")
    return jax.random.bernoulli(draw, config.layerdrop, (config.num_hidden_layers,))


def _stack_layers(variables: dict) -> dict:
    """Per-layer parameters {'0': ..., '1': ...} -> {'scan': the same, stacked on axis 0}."""
    layers = variables["params"]

    def stack(*xs):
        if _is_box(xs[0]):  # at initialisation: logical-axis boxes gain the layer axis
            value = jnp.stack([x.unbox() for x in xs])
            return xs[0].replace_boxed(value).add_axis(0, {nn.PARTITION_NAME: None})
        return jnp.stack(xs)

    per_layer = [layers[str(i)] for i in range(len(layers))]
    return {"params": {"scan": jax.tree.map(stack, *per_layer, is_leaf=_is_box)}}


def _unstack_layers(variables: dict) -> dict:
    """{'scan': stacked} -> per-layer parameters (logical-axis boxes lose the layer axis)."""

    def take(x, i):
        if isinstance(x, nn.meta.AxisMetadata):
            return x.remove_axis(0, {nn.PARTITION_NAME: None}).replace_boxed(x.unbox()[i])
        return x[i]

    stacked = variables["params"]["scan"]
    first = jax.tree.leaves(stacked, is_leaf=_is_box)[0]
    n = (first.unbox() if _is_box(first) else first).shape[0]
    return {
        "params": {
            str(i): jax.tree.map(lambda x, i=i: take(x, i), stacked, is_leaf=_is_box)
            for i in range(n)
        }
    }


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _scan(cfg, sizes, deterministic, fused, x, bias, skips, length: int, *, shared, name):
    """`length` layers of `sizes` (heads, FFN width) as one `nn.scan` in the calling module:
    one parameter set broadcast over them (`shared`, cross-layer sharing) or one per layer
    stacked on axis 0. Returns the output and each layer's hidden state and attentions."""
    if shared:
        variables = {"variable_broadcast": "params", "variable_axes": {"intermediates": 0}}
    else:
        variables = {
            "variable_axes": {"params": 0, "intermediates": 0},
            "metadata_params": {nn.PARTITION_NAME: None},  # logical axes gain the layer axis
        }
    scanned = nn.scan(
        _layer_class(cfg),
        split_rngs={"params": not shared, "dropout": True},
        in_axes=nn.broadcast if skips is None else (nn.broadcast, 0),
        length=length,
        **variables,
    )
    layers = scanned(cfg, *sizes, deterministic, fused, name=name)
    x, (xs, probs) = layers(x, bias) if skips is None else layers(x, bias, skips)
    return x, list(xs), [None] * length if probs is None else list(probs)


class ScannedLayers(nn.Module):
    """Every layer of a uniform, unshared stack as one `nn.scan` (`scans_every_layer`);
    `Encoder` stores its parameters per layer, as `LayerStack` does."""

    config: BertConfig
    deterministic: bool
    need_probs: bool = True

    @nn.compact
    def __call__(self, x, bias):
        cfg, n = self.config, self.config.num_hidden_layers
        fused = _use_fused(cfg, self.deterministic, self.need_probs)
        skips_N = _layerdrop_skips(self, cfg, self.deterministic)
        sizes = (cfg.layer_heads(0), cfg.layer_intermediate(0))
        x, xs, attentions = _scan(
            cfg, sizes, self.deterministic, fused, x, bias, skips_N, n, shared=False, name="scan"
        )
        return x, tuple(xs), tuple(attentions)


class Encoder(nn.Module):
    config: BertConfig
    need_probs: bool = True

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        if scans_every_layer(self.config):
            stack = nn.map_variables(
                ScannedLayers,
                "params",
                trans_in_fn=_stack_layers,
                trans_out_fn=_unstack_layers,
                init=self.is_initializing(),
            )
            layers = stack(self.config, deterministic, self.need_probs, name="layer")
            last, hidden, attentions = layers(x, bias)
            return last, (x, *hidden), attentions
        return LayerStack(self.config, deterministic, self.need_probs, name="layer")(x, bias)


class Pooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x_BxLxH):
        dense = Linear(self.config, self.config.hidden_size, (EMBED, HIDDEN), name="dense")
        return jnp.tanh(dense(x_BxLxH[:, 0]))


class BertBackbone(nn.Module):
    """HF's `BertModel`: embeddings, encoder, pooler."""

    config: BertConfig
    need_probs: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, deterministic: bool):
        cfg = self.config
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
        bias_Bx1x1xL = token_select.bias_from_mask(attention_mask > 0)
        encoder = Encoder(cfg, self.need_probs, name="encoder")
        x, hidden, attn = encoder(x, bias_Bx1x1xL, deterministic)
        return x, Pooler(cfg, name="pooler")(x), hidden, attn


class Bert(nn.Module):
    """BERT with an optional sequence-classification / regression head (HF naming).

    `model.apply({'params': params}, input_ids, ..., rngs={'dropout': key})` for training;
    `deterministic=True` (default) for evaluation.

    Args:
      config: the model's `BertConfig` (the module's one field).

    Call args:
      input_ids: int [B, L] token ids.
      attention_mask: [B, L], 1 for real tokens; None attends to every position.
      token_type_ids: [B, L] segment ids; None means all zeros.
      deterministic: no dropout when True.
      output_hidden_states: also return the embeddings output and every layer's output.
      output_attentions: also return every layer's attention probabilities.

    Returns:
      A `BertOutput`: last_hidden_state, pooled_output, logits (None without a task head),
      and hidden_states / attentions when asked for.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BertOutput:
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # Without output_attentions, attention runs fused where nothing else needs its
        # probabilities (see LayerStack).
        last, pooled, hidden, attn = BertBackbone(cfg, output_attentions, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        logits = None
        if cfg.num_labels > 0:
            h = nn.Dropout(cfg.hidden_dropout_prob)(pooled, deterministic=deterministic)
            head = Linear(cfg, cfg.num_labels, (HIDDEN, CLASSES), name="classifier")
            logits = head(h).astype(jnp.float32)
        return BertOutput(
            last_hidden_state=last,
            pooled_output=pooled,
            logits=logits,
            hidden_states=hidden if output_hidden_states else None,
            attentions=attn if output_attentions else None,
        )


def layer_projections(config: BertConfig, intermediates: dict) -> tuple[dict[str, jax.Array], ...]:
    """Each layer's queries, keys and values (B, L, heads * head_size), in layer order, from
    the `intermediates` of an apply with `mutable=["intermediates"]` (scanned or not)."""
    layers = intermediates["bert"]["encoder"]["layer"]
    calls_so_far: dict[int, int] = {}
    out = []
    for layer in range(config.num_hidden_layers):
        group = config.attention_group(layer)
        k = calls_so_far.get(group, 0)
        calls_so_far[group] = k + 1
        if "scan" in layers:  # every layer in one scan (`scans_every_layer`)
            group, k = "scan", layer
        sown = layers[str(group)]["attention"]["self"]
        projections = {}
        for name in ("queries", "keys", "values"):
            calls = sown[name]
            # A scanned run sows once, stacked over its layers: (repeats, B, L, W).
            projections[name] = calls[0][k] if calls[0].ndim == 4 else calls[k]
        out.append(projections)
    return tuple(out)


def init_params(config: BertConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Fresh parameters of `Bert(config)` (plain arrays, logical-axis boxes removed).

    Args:
      config: the model's `BertConfig`.
      rng: the random key of the initialisation.
      seq_len: the sequence length of the dummy input used to trace the model.

    Returns:
      The parameter tree (the `params` collection).
    """
    ids = jnp.zeros((1, seq_len), jnp.int32)
    variables = Bert(config).init(rng, ids)
    return nn.meta.unbox(variables["params"])


def unshare_layers(config: BertConfig, params: dict) -> tuple[BertConfig, dict]:
    """Give every layer its own copy of the parameters it uses (identity on unshared models)."""
    prefix = "bert/encoder/layer/"
    flat = flatten_dict(params, sep="/")
    out = {k: v for k, v in flat.items() if not k.startswith(prefix)}
    ranks = {m: r for m, r in config.low_rank if not m.startswith(prefix)}
    for layer in range(config.num_hidden_layers):
        for group, attention in (
            (config.attention_group(layer), True),
            (config.ffn_group(layer), False),
        ):
            src = f"{prefix}{group}/"
            for path, value in flat.items():
                rest = path[len(src) :]
                if path.startswith(src) and rest.startswith("attention/") == attention:
                    out[f"{prefix}{layer}/{rest}"] = value
            for module, rank in config.low_rank:  # a low-rank shared module: every user's copy
                rest = module[len(src) :]
                if module.startswith(src) and rest.startswith("attention/") == attention:
                    ranks[f"{prefix}{layer}/{rest}"] = rank
    unshared = config.replace(
        attention_groups=None, ffn_groups=None, low_rank=tuple(sorted(ranks.items()))
    )
    return unshared, unflatten_dict(out, sep="/")


def _abstract_boxed(config: BertConfig) -> dict:
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(Bert(config).init, jax.random.key(0), ids)["params"]


def abstract_params(config: BertConfig) -> dict:
    """Parameter shapes and dtypes (`jax.ShapeDtypeStruct`s) without allocating them."""
    return nn.meta.unbox(_abstract_boxed(config))


def param_logical_axes(config: BertConfig) -> dict:
    """The logical axis names of every parameter, as a tree of `PartitionSpec`s."""
    return nn.get_partition_spec(_abstract_boxed(config))
