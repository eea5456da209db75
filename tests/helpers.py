"""Tiny real-format models for fast tests."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict

from jaxcompress.config import finetune_defaults, merge
from jaxcompress.models.bert import BertConfig, init_params
from jaxcompress.models.hf import save_pretrained

# The repository root, whatever the depth of the test file that imports it.
REPO = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> BertConfig:
    base = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertConfig(**{**base, **changes})


def peaked_config(layers: int, **changes) -> BertConfig:
    """Unshared layers with peaked attention (large init), a small vocabulary and no dropout:
    each layer clearly changes its input, and training mode differs from evaluation only by
    what a test switches on."""
    base = dict(
        num_hidden_layers=layers,
        vocab_size=512,
        num_labels=2,
        initializer_range=0.2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tiny_config(**{**base, **changes})


def compressed_tiny_config(
    num_labels: int = 2, low_rank_module: str = "intermediate"
) -> BertConfig:
    """Every compressed shape at once: pruned heads and neurons, E, sharing, a low-rank layer."""
    return tiny_config(
        num_hidden_layers=3,
        num_labels=num_labels,
        heads_per_layer=(4, 2, 2),
        intermediate_per_layer=(64, 16, 16),
        embedding_size=8,
        attention_groups=(0, 1, 1),
        ffn_groups=(0, 1, 1),
        low_rank=((f"bert/encoder/layer/0/{low_rank_module}/dense", 5),),
    )


def save_tiny_model(path: Path, tokenizer_dir: Path, seed: int = 0, **changes) -> Path:
    """A random tiny BERT with the MiniLM vocabulary, saved as a Hugging Face directory."""
    config = tiny_config(**changes)
    params = init_params(config, jax.random.key(seed))
    return save_pretrained(config, params, path, tokenizer_dir=tokenizer_dir)


def param_count(params) -> int:
    """The number of scalars in a parameter tree."""
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


LAYER = "bert/encoder/layer/"


def assert_layers_taken(student: dict, teacher: dict, layers) -> None:
    """Student layer j is exactly teacher layer `layers[j]`; every other array is the
    teacher's own."""
    ours, theirs = flatten_dict(student, sep="/"), flatten_dict(teacher, sep="/")
    for path, value in ours.items():
        if path.startswith(LAYER):
            j, rest = path[len(LAYER) :].split("/", 1)
            np.testing.assert_array_equal(value, theirs[f"{LAYER}{layers[int(j)]}/{rest}"])
        else:
            np.testing.assert_array_equal(value, theirs[path])


def tiny_run_config(model_dir, glue_dir, **train_changes):
    c = ml_collections.ConfigDict()
    c.model = str(model_dir)
    c.glue_dir = str(glue_dir)
    c.task = "sst2"
    c.max_length = 64
    c.buckets = (64,)  # one padded length: one compiled train and eval program per run
    c.log_every = 2
    c.checkpoint_every = 2
    c.checkpoint_keep = 5
    c.train = ml_collections.ConfigDict(
        {"examples": 32, "batch_size": 8, "steps": 6, "lr": 1e-3, **train_changes}
    )
    c.eval = ml_collections.ConfigDict({"batch_size": 128, "examples": 128})  # one batch
    return merge(finetune_defaults(), c)


def tiny_model_run_config(tmp_path, minilm_dir, glue_dir, steps: int):
    """`tiny_run_config` of a fresh tiny SST-2 model saved under tmp_path, one bucket."""
    model_dir = save_tiny_model(tmp_path / "tiny", minilm_dir, num_labels=2)
    config = tiny_run_config(model_dir, glue_dir, steps=steps)
    with config.unlocked():
        config.buckets = (64,)
    return config


def simulated_devices_env(count: int) -> dict[str, str]:
    """The environment of a subprocess that sees `count` simulated CPU devices. On a loaded
    two-core machine (two pytest processes at once) one device thread can miss XLA's default
    40 s collective rendezvous, so both collective timeouts are raised; XLA's warnings about
    resharding tiny arrays are silenced."""
    flags = (
        os.environ.get("XLA_FLAGS", "")  # the caller's own flags carry over
        + f" --xla_force_host_platform_device_count={count}"
        + " --xla_cpu_collective_timeout_seconds=600"
        + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    ).strip()
    return {**os.environ, "XLA_FLAGS": flags, "TF_CPP_MIN_LOG_LEVEL": "2"}


def token_batch(seed: int = 0, batch: int = 4, length: int = 12) -> dict:
    """A full-length batch of random token ids (no padding), as a model's apply takes it."""
    ids = jax.random.randint(jax.random.key(seed), (batch, length), 1000, 2000)
    return {
        "input_ids": ids,
        "attention_mask": jnp.ones_like(ids),
        "token_type_ids": jnp.zeros_like(ids),
    }


def batch_logits(model, params, batch: dict):
    """`model`'s logits on a `token_batch` (any object with a linen-style `apply`)."""
    return model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    ).logits
