"""Student construction from a teacher: keep layers, shrink width, or start from scratch."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.models import bert_rules
from jaxcompress.models.bert import (
    EMBED,
    HIDDEN,
    MLP,
    QKV,
    Bert,
    BertConfig,
    init_params,
    param_logical_axes,
    unshare_layers,
)

# "drop_top" ... "contribution" are Sajjad et al.'s (Poor Man's BERT) dropping strategies;
# "layerdrop" is Fan et al.'s every-other pruning of a LayerDrop-trained model.
WIDTH_INITS = ("slice", "magnitude", "fresh")
LAYER_STRATEGIES = (
    "every_other",
    "uniform",
    "first",
    "top",
    "drop_top",
    "drop_bottom",
    "alternate",
    "symmetric",
    "contribution",
    "layerdrop",
)

_LAYER = bert_rules.LAYER_PREFIX


def _alternate(num_layers: int, keep: int) -> tuple[int, ...]:
    """Drop every other layer starting from the top, again on what is left if that is not
    enough (6 -> 3 drops 5, 3, 1; 6 -> 2 then also drops 4)."""
    kept = list(range(num_layers))
    while len(kept) > keep:
        dropped = set(kept[::-1][::2][: len(kept) - keep])
        kept = [i for i in kept if i not in dropped]
    return tuple(kept)


def select_layers(
    num_layers: int,
    keep: int,
    strategy: str = "every_other",
    contributions: Sequence[float] | None = None,
) -> tuple[int, ...]:
    """The teacher layers (0-based, increasing) a `keep`-layer student starts from.

    "every_other" / "uniform": evenly spaced, ending at the last layer (6 -> 3 keeps 1, 3, 5);
    "first" / "drop_top": the bottom `keep` layers; "top" / "drop_bottom": the last `keep`;
    "alternate": drop every other layer from the top down (6 -> 3 keeps 0, 2, 4; 12 -> 6
    keeps 0, 2, ..., 10); "symmetric": drop from the middle, keeping the bottom
    ceil(keep / 2) and the top floor(keep / 2) (6 -> 3 keeps 0, 1, 5);
    "contribution": the `keep` layers with the largest `contributions` (see
    `layer_contributions`; ties keep the lower layer); "layerdrop": evenly spaced from the
    bottom, layer floor(j * num_layers / keep) for j < keep, which is Fan et al.'s rule
    "drop depth d (1-based) when d = 0 mod k" whenever num_layers / (num_layers - keep) is an
    integer k (12 -> 8 keeps 0, 1, 3, 4, 6, 7, 9, 10; 6 -> 3 keeps 0, 2, 4).
    """
    if strategy not in LAYER_STRATEGIES:
        raise ValueError(f"strategy must be one of {LAYER_STRATEGIES}, got {strategy!r}")
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be in 1..{num_layers}, got {keep}")
    if (strategy == "contribution") != (contributions is not None):
        raise ValueError("contributions are needed by, and only by, strategy='contribution'")
    if strategy in ("first", "drop_top"):
        return tuple(range(keep))
    if strategy in ("top", "drop_bottom"):
        return tuple(range(num_layers - keep, num_layers))
    if strategy == "alternate":
        return _alternate(num_layers, keep)
    if strategy == "symmetric":
        bottom = (keep + 1) // 2
        return tuple(range(bottom)) + tuple(range(num_layers - (keep - bottom), num_layers))
    if strategy == "contribution":
        scores = np.asarray(contributions, np.float64)
        if scores.shape != (num_layers,):
            raise ValueError(f"contributions has shape {scores.shape}, expected ({num_layers},)")
        return tuple(sorted(int(i) for i in np.argsort(-scores, kind="stable")[:keep]))
    if strategy == "layerdrop":
        return tuple(j * num_layers // keep for j in range(keep))
    return tuple((j + 1) * num_layers // keep - 1 for j in range(keep))


def layer_hidden_states(
    config: BertConfig, params: dict, batches: Iterable[dict]
) -> list[tuple[tuple[np.ndarray, ...], np.ndarray]]:
    """Per batch (dicts of input_ids, attention_mask, token_type_ids): the evaluation-mode
    hidden states (embeddings output, then each layer's, each B x L x H) and the B x L
    attention mask; the input `layer_contributions` and strategy="contribution" need."""
    out = []
    for batch in batches:
        mask = batch["attention_mask"]
        states = _hidden_states(config, params, batch["input_ids"], mask, batch["token_type_ids"])
        out.append((tuple(np.asarray(h) for h in states), np.asarray(mask)))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _hidden_states(config: BertConfig, params: dict, ids, mask, types) -> tuple[jax.Array, ...]:
    out = Bert(config).apply({"params": params}, ids, mask, types, output_hidden_states=True)
    return out.hidden_states


def layer_contributions(
    hidden_states: Sequence[Sequence[np.ndarray]], masks: Sequence[np.ndarray]
) -> np.ndarray:
    """Per layer, 1 - the cosine similarity of its output to its input, averaged over the
    real tokens (mask > 0) of every batch: near 0 for a layer that changes little.

    `hidden_states[b]` is batch b's (embeddings, layer 1, ..., layer N) outputs, each
    B x L x H; `masks[b]` its B x L attention mask. Returns float64 of shape (N,).
    """
    if not masks or len(hidden_states) != len(masks):
        raise ValueError(
            f"need one mask per batch and at least one batch, got {len(hidden_states)} "
            f"hidden-state tuples and {len(masks)} masks"
        )
    total, tokens = None, 0
    for states, mask in zip(hidden_states, masks, strict=True):
        h = np.stack([np.asarray(s, np.float64) for s in states])  # (N + 1, B, L, H)
        real = np.asarray(mask) > 0
        x, y = h[:-1][:, real], h[1:][:, real]  # (N, T, H) inputs and outputs of each layer
        norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
        cosine = np.sum(x * y, -1) / np.maximum(norms, np.finfo(np.float64).tiny)
        total = cosine.sum(-1) if total is None else total + cosine.sum(-1)
        tokens += int(real.sum())
    if tokens == 0:
        raise ValueError("the masks select no real token")
    return 1.0 - total / tokens


def _renumber_low_rank(config: BertConfig, layers: Sequence[int]) -> tuple[tuple[str, int], ...]:
    """low_rank entries for the student: layer entries follow the group each kept layer used."""
    out = []
    for path, rank in config.low_rank:
        match = re.fullmatch(rf"{_LAYER}(\d+)/(.+)", path)
        if match is None:
            out.append((path, rank))
            continue
        group, rest = int(match[1]), match[2]
        group_of = config.attention_group if rest.startswith("attention/") else config.ffn_group
        out += [(f"{_LAYER}{j}/{rest}", rank) for j, t in enumerate(layers) if group_of(t) == group]
    return tuple(sorted(out))


def keep_layers(config: BertConfig, params: dict, layers: Sequence[int]) -> tuple[BertConfig, dict]:
    """A student whose layer j is a copy of teacher layer `layers[j]` (unshared, even if the
    teacher shares); embeddings, pooler and classifier are kept."""
    n = config.num_hidden_layers
    layers = tuple(int(i) for i in layers)
    increasing = all(a < b for a, b in zip(layers, layers[1:], strict=False))
    if not layers or not increasing or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"layers must be strictly increasing indices in 0..{n - 1}, got {layers}")
    low_rank = _renumber_low_rank(config, layers)
    unshared, params = unshare_layers(config, params)
    flat = flatten_dict(params, sep="/")
    out = {k: v for k, v in flat.items() if not k.startswith(_LAYER)}
    for j, t in enumerate(layers):
        src = f"{_LAYER}{t}/"
        out |= {f"{_LAYER}{j}/{k[len(src) :]}": v for k, v in flat.items() if k.startswith(src)}

    def subset(values: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if values is None else tuple(values[t] for t in layers)

    student = unshared.replace(
        num_hidden_layers=len(layers),
        heads_per_layer=subset(config.heads_per_layer),
        intermediate_per_layer=subset(config.intermediate_per_layer),
        low_rank=low_rank,
    )
    return student, unflatten_dict(out, sep="/")


def layerdrop_subnetwork(config: BertConfig, params: dict, keep: int) -> tuple[BertConfig, dict]:
    """The `keep`-layer sub-network of a LayerDrop-trained model, by Fan et al.'s every-other
    rule (`select_layers(..., "layerdrop")`); used as is, without fine-tuning."""
    return keep_layers(config, params, select_layers(config.num_hidden_layers, keep, "layerdrop"))


def _fresh(config: BertConfig, like: dict, seed: int) -> dict:
    """`init_params` of config, each leaf in the dtype of the matching leaf of `like`."""
    fresh = init_params(config, jax.random.key(seed))
    return jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), fresh, like)


def shrink_width(
    config: BertConfig,
    params: dict,
    *,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    init: str = "slice",
    seed: int = 0,
) -> tuple[BertConfig, dict]:
    """A narrower student of an uncompressed model; `None` keeps the teacher's width.

    `init="slice"` keeps the first `hidden_size` hidden dimensions, the first `num_heads`
    heads (head size unchanged) and the first `intermediate_size` FFN neurons of every
    parameter; `init="magnitude"` keeps those with the most weight (the sum of squares of
    every parameter entry on that hidden dimension, head or neuron, over all layers), a
    width reduction by importance in the spirit of schuBERT; `init="fresh"` draws new
    parameters from `seed`.
    """
    if compressed := config.compressed_fields():
        raise ValueError(f"shrink_width needs an uncompressed model; config.{compressed[0]} is set")
    if init not in WIDTH_INITS:
        raise ValueError(f"init must be one of {WIDTH_INITS}, got {init!r}")
    h = config.hidden_size if hidden_size is None else hidden_size
    n = config.num_attention_heads if num_heads is None else num_heads
    f = config.intermediate_size if intermediate_size is None else intermediate_size
    for name, value, limit in (
        ("hidden_size", h, config.hidden_size),
        ("num_heads", n, config.num_attention_heads),
        ("intermediate_size", f, config.intermediate_size),
    ):
        if not 1 <= value <= limit:
            raise ValueError(f"{name} must be in 1..{limit}, got {value}")
    d = config.attention_head_size
    student = config.replace(
        hidden_size=h,
        num_attention_heads=n,
        intermediate_size=f,
        head_size=None if config.head_size is None and h == n * d else d,
    )
    if init == "fresh":
        return student, _fresh(student, params, seed)
    # Every parameter axis is named by its logical axis, so one index set per name cuts them all.
    axes = flatten_dict(param_logical_axes(config), sep="/")
    flat = flatten_dict(params, sep="/")
    sizes = {EMBED: h, HIDDEN: h, QKV: n * d, MLP: f}
    if init == "slice":
        keep = {axis: np.arange(size) for axis, size in sizes.items()}
    else:
        groups = {EMBED: 1, HIDDEN: 1, QKV: d, MLP: 1}  # heads are kept or dropped whole
        keep = {
            axis: _heaviest(_axis_weight(flat, axes, axis), size // groups[axis], groups[axis])
            for axis, size in sizes.items()
        }
    out = {}
    for path, x in flat.items():
        for dim, axis in enumerate(axes[path]):
            if axis in keep:
                x = jnp.take(x, keep[axis], axis=dim)
        out[path] = x
    return student, unflatten_dict(out, sep="/")


def _axis_weight(flat: dict, axes: dict, name: str) -> np.ndarray:
    """Per index of logical axis `name`: the sum of squares of every entry on it."""
    total = 0.0
    for path, x in flat.items():
        for dim, axis in enumerate(axes[path]):
            if axis == name:
                other = tuple(i for i in range(x.ndim) if i != dim)
                total = total + np.sum(np.square(np.asarray(x, np.float32)), axis=other)
    return np.asarray(total)


def _heaviest(weight: np.ndarray, count: int, group: int) -> np.ndarray:
    """The indices of the `count` heaviest groups of `group` consecutive indices, in order."""
    per_group = weight.reshape(-1, group).sum(axis=1)
    chosen = np.sort(np.argsort(-per_group, kind="stable")[:count])
    return (chosen[:, None] * group + np.arange(group)[None, :]).reshape(-1)


def reinitialize(config: BertConfig, params: dict, seed: int = 0) -> tuple[BertConfig, dict]:
    """Same shape, fresh parameters: the from-scratch baseline (dtypes kept)."""
    return config, _fresh(config, params, seed)
