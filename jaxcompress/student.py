"""Student construction from a teacher: keep layers, shrink width, or start from scratch."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcompress.models.bert import (
    EMBED,
    HIDDEN,
    MLP,
    QKV,
    BertConfig,
    init_params,
    param_logical_axes,
    unshare_layers,
)

LAYER_STRATEGIES = ("every_other", "uniform", "first", "top")

_LAYER = "bert/encoder/layer/"


def select_layers(num_layers: int, keep: int, strategy: str = "every_other") -> tuple[int, ...]:
    """The teacher layers (0-based) a `keep`-layer student starts from.

    "every_other" / "uniform": evenly spaced, ending at the last layer (6 -> 3 keeps 1, 3, 5);
    "first": the bottom `keep` layers; "top": the last `keep` layers.
    """
    if strategy not in LAYER_STRATEGIES:
        raise ValueError(f"strategy must be one of {LAYER_STRATEGIES}, got {strategy!r}")
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be in 1..{num_layers}, got {keep}")
    if strategy == "first":
        return tuple(range(keep))
    if strategy == "top":
        return tuple(range(num_layers - keep, num_layers))
    return tuple((j + 1) * num_layers // keep - 1 for j in range(keep))


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
    parameter; `init="fresh"` draws new parameters from `seed`.
    """
    if compressed := config.compressed_fields():
        raise ValueError(f"shrink_width needs an uncompressed model; config.{compressed[0]} is set")
    if init not in ("slice", "fresh"):
        raise ValueError(f"init must be 'slice' or 'fresh', got {init!r}")
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
    # Every parameter axis is named by its logical axis, so one size per name slices them all.
    sizes = {EMBED: h, HIDDEN: h, QKV: n * d, MLP: f}
    axes = flatten_dict(param_logical_axes(config), sep="/")
    flat = flatten_dict(params, sep="/")
    out = {
        path: x[tuple(slice(0, sizes.get(axis)) for axis in axes[path])] for path, x in flat.items()
    }
    return student, unflatten_dict(out, sep="/")


def reinitialize(config: BertConfig, params: dict, seed: int = 0) -> tuple[BertConfig, dict]:
    """Same shape, fresh parameters: the from-scratch baseline (dtypes kept)."""
    return config, _fresh(config, params, seed)
