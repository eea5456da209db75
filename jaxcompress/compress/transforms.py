"""Structure transforms by name, so configs can list them: `"share_layers(groups='all')"`."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxcompress.compress import factorize, share
from jaxcompress.compress.distill import student
from jaxcompress.compress.prune import structured
from jaxcompress.core import StructureTransform, compose
from jaxcompress.errors import UserError
from jaxcompress.models.bert import BertConfig
from jaxcompress.models.bert_rules import LOW_RANK_TARGETS


@dataclasses.dataclass(frozen=True)
class TransformContext:
    """What a transform may need beyond (config, params), supplied lazily by the caller."""

    token_counts: Callable[[int], np.ndarray] | None = None  # vocab size -> train token counts
    # (config, params) of the model being transformed -> per train batch, the pair
    # (hidden states: embeddings output then each of the config's layers, each B x L x H,
    # evaluation mode; B x L attention mask), e.g. `student.layer_hidden_states`.
    hidden_states: (
        Callable[[BertConfig, dict], Sequence[tuple[Sequence[np.ndarray], np.ndarray]]] | None
    ) = None
    # (config, params) -> per train batch, the gradient tree of the task loss (dropout off),
    # e.g. `structured.task_gradient_fn(batches)`: what head and neuron importance read.
    gradients: structured.GradientFn | None = None


def share_layers(groups="all", scope: str = "layer", init="mean") -> StructureTransform:
    """Cross-layer sharing (ALBERT) of whole layers, attention only, or FFN only.

    Args:
      groups: 'all' (one shared layer), 'every:K' (K consecutive layers per group) or a
        layer -> group list, e.g. (0, 0, 1, 1).
      scope: 'layer', 'attention' or 'ffn': which part of each layer is shared.
      init: each shared group's value: 'mean', 'first' or 'last' member, or a layer index.

    Returns:
      A `(config, params) -> (config, params)` structure transform to the shared model.
    """
    if scope not in ("layer", "attention", "ffn"):
        raise ValueError(f"scope must be 'layer', 'attention' or 'ffn', got {scope!r}")

    def transform(config: BertConfig, params: dict):
        group_map = share.group_map(groups, config.num_hidden_layers)
        maps = {
            "attention_groups": group_map if scope in ("layer", "attention") else None,
            "ffn_groups": group_map if scope in ("layer", "ffn") else None,
        }
        return share.share_layers(config, params, init=init, **maps)

    return transform


def factorize_embeddings(
    embedding_size: int,
    init: str = "svd",
    seed: int = 0,
    *,
    context: TransformContext | None = None,
) -> StructureTransform:
    """ALBERT's V x E, E x H embedding factorization of the word-embedding table.

    Args:
      embedding_size: E, in 1..hidden_size.
      init: 'svd' (truncated SVD of the trained table), 'frequency_svd' (the SVD weighted by
        training-token counts) or 'fresh' (random factors).
      seed: the random key's seed for init='fresh'.
      context: supplies `token_counts` for init='frequency_svd'.

    Returns:
      A `(config, params) -> (config, params)` structure transform to the factorized model.
    """
    if init == "frequency_svd" and (context is None or context.token_counts is None):
        raise ValueError("init='frequency_svd' needs training token counts from the caller")

    def transform(config: BertConfig, params: dict):
        counts = context.token_counts(config.vocab_size) if init == "frequency_svd" else None
        return factorize.factorize_embeddings(
            config, params, embedding_size, init=init, key=jax.random.key(seed), token_counts=counts
        )

    return transform


def low_rank(
    target: str = "ffn",
    fraction: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    pattern: str | None = None,
) -> StructureTransform:
    """Truncated-SVD factorization of BERT's dense kernels: each becomes kernel_a @ kernel_b.

    Args:
      target: 'ffn', 'attention' or 'all' (`bert_rules.LOW_RANK_TARGETS`); ignored when
        `pattern` is given.
      fraction: kept rank as a share of full rank (give exactly one of fraction, rank, energy).
      rank: kept rank.
      energy: the smallest rank keeping this share of the squared singular values.
      pattern: a regex on parameter paths choosing the kernels instead of `target`.

    Returns:
      A `(config, params) -> (config, params)` structure transform to the factorized model.
    """
    if pattern is None:
        if target not in LOW_RANK_TARGETS:
            raise ValueError(f"target must be one of {sorted(LOW_RANK_TARGETS)}, got {target!r}")
        pattern = LOW_RANK_TARGETS[target]
    spec = factorize.LowRank(rank=rank, fraction=fraction, energy=energy)
    return functools.partial(factorize.low_rank, rules=[(pattern, spec)])


def keep_layers(
    keep: int | None = None,
    strategy: str = "every_other",
    layers: tuple | list | None = None,
    *,
    context: TransformContext | None = None,
) -> StructureTransform:
    """A shallower student: `keep` teacher layers chosen by `strategy`, or the given `layers`.

    Args:
      keep: how many layers to keep (give exactly one of keep and layers).
      strategy: how to choose them (`student.LAYER_STRATEGIES`, e.g. 'every_other');
        'contribution' measures each layer on the context's hidden states of training batches.
      layers: the teacher layers to keep, in order.
      context: supplies `hidden_states` for strategy='contribution'.

    Returns:
      A `(config, params) -> (config, params)` structure transform to the student.
    """
    if (keep is None) == (layers is None):
        raise ValueError("keep_layers needs exactly one of keep or layers")
    if strategy not in student.LAYER_STRATEGIES:
        raise ValueError(f"strategy must be one of {student.LAYER_STRATEGIES}, got {strategy!r}")
    contribution = strategy == "contribution" and layers is None
    if contribution and (context is None or context.hidden_states is None):
        raise ValueError(
            "strategy='contribution' needs the hidden states of training batches from the "
            "caller (TransformContext.hidden_states)"
        )

    def transform(config: BertConfig, params: dict):
        chosen = layers
        if chosen is None:
            scores = None
            if contribution:
                batches = context.hidden_states(config, params)
                scores = student.layer_contributions(
                    [s for s, _ in batches], [m for _, m in batches]
                )
            chosen = student.select_layers(config.num_hidden_layers, keep, strategy, scores)
        return student.keep_layers(config, params, chosen)

    return transform


def shrink_width(
    hidden_size: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    init: str = "slice",
    seed: int = 0,
) -> StructureTransform:
    """A narrower student: sliced from the teacher, its heaviest dimensions kept, or fresh.

    Args:
      hidden_size: the student's hidden width; None keeps the teacher's.
      num_heads: the student's heads per layer (head size unchanged); None keeps them.
      intermediate_size: the student's FFN width; None keeps the teacher's.
      init: 'slice' (the first dimensions), 'magnitude' (the heaviest) or 'fresh'.
      seed: the random seed for init='fresh'.

    Returns:
      A `(config, params) -> (config, params)` structure transform from an uncompressed
      model to the student.
    """
    if init not in student.WIDTH_INITS:
        raise ValueError(f"init must be one of {student.WIDTH_INITS}, got {init!r}")
    return functools.partial(
        student.shrink_width,
        hidden_size=hidden_size,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        init=init,
        seed=seed,
    )


def reinitialize(seed: int = 0) -> StructureTransform:
    """Same shape, fresh parameters: the from-scratch baseline."""
    return functools.partial(student.reinitialize, seed=seed)


def prune_units(
    kind: str,
    fraction: float,
    scope: str = "global",
    steps: int = 1,
    min_per_layer: int = 0,
    *,
    context: TransformContext | None = None,
) -> StructureTransform:
    """Remove `fraction` of the attention heads (`kind='heads'`, least important first by
    Michel et al.'s |dL/d gate| on training batches) or FFN neurons (`'ffn'`), in `steps`
    rounds; the model physically shrinks."""
    if context is None or context.gradients is None:
        raise ValueError(
            f"prune_{kind} needs task-loss gradients from the caller (context.gradients)"
        )
    return structured.prune_units(
        kind, fraction, scope, steps, gradient_fn=context.gradients, min_per_layer=min_per_layer
    )


REGISTRY: dict[str, Callable[..., StructureTransform]] = {
    "share_layers": share_layers,
    "factorize_embeddings": factorize_embeddings,
    "low_rank": low_rank,
    "keep_layers": keep_layers,
    "shrink_width": shrink_width,
    "reinitialize": reinitialize,
    "prune_heads": functools.partial(prune_units, "heads"),
    "prune_ffn": functools.partial(prune_units, "ffn"),
}


class TransformSpecError(UserError, ValueError):
    """A transform spec in a config that does not parse or names an unknown transform."""


def parse(text: str, context: TransformContext | None = None) -> StructureTransform:
    """`"name(key=literal, ...)"` -> the transform; unknown names and arguments raise."""
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise TransformSpecError(
            f"transform {text!r} is not of the form name(key=value, ...)"
        ) from e
    if isinstance(call, ast.Name):
        call = ast.Call(func=call, args=[], keywords=[])
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
        raise TransformSpecError(f"transform {text!r} is not of the form name(key=value, ...)")
    name = call.func.id
    if name not in REGISTRY:
        raise TransformSpecError(f"unknown transform {name!r}; known: {sorted(REGISTRY)}")
    try:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except ValueError as e:
        raise TransformSpecError(f"transform {text!r}: arguments must be literals") from e
    factory = REGISTRY[name]
    if "context" in kwargs:
        raise TransformSpecError(f"transform {text!r}: 'context' is supplied by the caller")
    if "context" in inspect.signature(factory).parameters:
        kwargs["context"] = context
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as e:  # unknown or bad arguments
        raise TransformSpecError(f"transform {text!r}: {e}") from None


def from_specs(
    specs: tuple[str, ...] | list[str], context: TransformContext | None = None
) -> StructureTransform:
    """The composition of a config's `transforms` list."""
    return compose(*(parse(s, context) for s in specs))
