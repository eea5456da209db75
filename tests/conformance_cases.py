"""Every transform, at zero strength and at a real strength: the conformance suite's registry.

Later transforms add a `Case` here; tests/compress/test_conformance.py runs every check on
every case.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxcompress.compress import transforms
from jaxcompress.models.bert import Bert, init_params
from tests.helpers import tiny_config


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    identity: Callable  # zero strength: (config, params) -> (config, params), same function
    strong: Callable  # a real compression


CASES = [
    Case(
        "factorize_embeddings",
        transforms.factorize_embeddings(embedding_size=32),
        transforms.factorize_embeddings(embedding_size=8),
    ),
    Case(
        "low_rank_all",
        transforms.low_rank(target="all", fraction=1.0),
        transforms.low_rank(target="all", fraction=0.25),
    ),
    Case(
        "share_layers",
        transforms.share_layers(groups=[0, 1, 2]),
        transforms.share_layers(groups="all"),
    ),
    Case(
        "share_attention_every_2",
        transforms.share_layers(groups=[0, 1, 2], scope="attention"),
        transforms.share_layers(groups="every:2", scope="attention"),
    ),
    Case(
        "share_ffn",
        transforms.share_layers(groups=[0, 1, 2], scope="ffn", init="first"),
        transforms.share_layers(groups="all", scope="ffn", init="first"),
    ),
    Case(
        "keep_layers",
        transforms.keep_layers(layers=[0, 1, 2]),
        transforms.keep_layers(keep=2, strategy="every_other"),
    ),
    Case(
        "shrink_width",
        transforms.shrink_width(),
        transforms.shrink_width(hidden_size=16, num_heads=2, intermediate_size=32),
    ),
]


def model_and_batch(seed: int = 0):
    config = tiny_config(num_hidden_layers=3, num_labels=2, vocab_size=512)
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
