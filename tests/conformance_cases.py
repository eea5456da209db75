"""Every transform, at zero strength and at a real strength: the conformance suite's registry.

Later transforms add a `Case` here; tests/compress/test_conformance.py runs every check on
every case and checks that every entry of `transforms.REGISTRY` has one (but `UNCASED`).
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxcompress.compress import transforms
from jaxcompress.compress.prune import structured
from jaxcompress.models.bert import Bert, init_params
from tests.helpers import tiny_config


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    transform: str  # its name in transforms.REGISTRY
    identity: Callable  # zero strength: (config, params) -> (config, params), same function
    strong: Callable  # a real compression


@functools.cache
def _task_gradients() -> structured.GradientFn:
    """One gradient function on the conformance batch for every case: compiled once per config
    (and dtype), built on first use, not at import."""
    return structured.task_gradient_fn([model_and_batch()[2]])


def _gradients(config, params):
    return _task_gradients()(config, params)


_GRADIENTS = transforms.TransformContext(gradients=_gradients)

CASES = [
    Case(
        "factorize_embeddings",
        "factorize_embeddings",
        transforms.factorize_embeddings(embedding_size=32),
        transforms.factorize_embeddings(embedding_size=8),
    ),
    Case(
        "low_rank_all",
        "low_rank",
        transforms.low_rank(target="all", fraction=1.0),
        transforms.low_rank(target="all", fraction=0.25),
    ),
    Case(
        "share_layers",
        "share_layers",
        transforms.share_layers(groups=[0, 1]),
        transforms.share_layers(groups="all"),
    ),
    Case(
        "share_attention_every_2",
        "share_layers",
        transforms.share_layers(groups=[0, 1], scope="attention"),
        transforms.share_layers(groups="every:2", scope="attention"),
    ),
    Case(
        "share_ffn",
        "share_layers",
        transforms.share_layers(groups=[0, 1], scope="ffn", init="first"),
        transforms.share_layers(groups="all", scope="ffn", init="first"),
    ),
    Case(
        "keep_layers",
        "keep_layers",
        transforms.keep_layers(layers=[0, 1]),
        transforms.keep_layers(keep=1, strategy="every_other"),
    ),
    Case(
        "shrink_width",
        "shrink_width",
        transforms.shrink_width(),
        transforms.shrink_width(hidden_size=16, num_heads=2, intermediate_size=32),
    ),
    Case(
        "prune_heads",
        "prune_heads",
        transforms.REGISTRY["prune_heads"](fraction=0.0, context=_GRADIENTS),
        # Global: uneven heads per layer; at least one head each, so every layer trains.
        transforms.REGISTRY["prune_heads"](fraction=0.5, min_per_layer=1, context=_GRADIENTS),
    ),
    Case(
        "prune_ffn",
        "prune_ffn",
        transforms.REGISTRY["prune_ffn"](fraction=0.0, context=_GRADIENTS),
        transforms.REGISTRY["prune_ffn"](fraction=0.5, min_per_layer=1, context=_GRADIENTS),
    ),
]
# reinitialize has no strength (fresh parameters of the same shape), so no zero-strength
# identity and no smaller model: the conformance checks do not apply to it.
UNCASED = {"reinitialize"}


def model_and_batch(seed: int = 0, layers: int = 2):
    """A tiny BERT, its params and a padded batch of 4. Two layers by default: a train step
    of three compiles about 1.5 times as long, and the conformance cases need no third."""
    config = tiny_config(num_hidden_layers=layers, num_labels=2, vocab_size=512)
    params = init_params(config, jax.random.key(seed))
    ids = jax.random.randint(jax.random.key(seed + 1), (4, 12), 1, 512)
    mask = jnp.ones_like(ids).at[2:, 8:].set(0)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": jnp.zeros_like(ids),
        "labels": jnp.array([0, 1, 1, 0]),
        "example_mask": jnp.ones(4),
    }
    return config, params, batch


def logits(config, params, batch):
    return (
        Bert(config)
        .apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
        .logits
    )
