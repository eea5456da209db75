"""Native saved models: config + float parameters in safetensors, and their size in bytes."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

from jaxcompress.models.bert import BertConfig
from jaxcompress.models.hf import (
    ModelFormatError,
    ModelNotFoundError,
    copy_tokenizer,
    load_safetensors,
    read_json,
)

CONFIG_FILE, PARAMS_FILE = "jaxcompress_config.json", "params.safetensors"
EMBEDDING_PREFIX = "bert/embeddings/"
# What the survey counts as "embeddings": the lookup tables and ALBERT's projection.
_EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def is_embedding(path: str) -> bool:
    """Whether a parameter path is an embedding table (or ALBERT's E x H projection)."""
    if not path.startswith(EMBEDDING_PREFIX):
        return False
    return path.removeprefix(EMBEDDING_PREFIX) in (*_EMBEDDING_TABLES, "embedding_projection")


def save(
    config: BertConfig,
    params: dict,
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write `path/jaxcompress_config.json` and `path/params.safetensors` (exact round trip),
    plus the tokenizer files when `tokenizer_dir` is given."""
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, target)
    flat = {k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()}
    save_file(flat, target / PARAMS_FILE)
    (target / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return target


def load(path: str | os.PathLike) -> tuple[BertConfig, dict]:
    """The `(config, params)` a `save` wrote to `path`; a missing or unreadable file is a
    user error that names it."""
    source = Path(path)
    for name in (CONFIG_FILE, PARAMS_FILE):
        if not (source / name).exists():
            raise ModelNotFoundError(
                f"{source / name} does not exist (not a jaxcompress model); restore it or "
                "pass the model directory a transform stage wrote"
            )
    fields = read_json(source / CONFIG_FILE)
    known = {f.name for f in dataclasses.fields(BertConfig)}
    if unknown := sorted(set(fields) - known):
        raise ModelFormatError(
            f"{source / CONFIG_FILE}: unknown key {unknown[0]!r}; written by another "
            "jaxcompress version? save the model again with this one"
        )
    config = BertConfig(**fields)
    flat = {k: jnp.asarray(v) for k, v in load_safetensors(source / PARAMS_FILE).items()}
    return config, unflatten_dict(flat, sep="/")


def count_params(params: dict) -> int:
    """Number of stored parameters (a shared set counted once)."""
    return int(sum(np.size(x) for x in flatten_dict(params).values()))


def saved_bytes(params: dict) -> dict[str, int]:
    """Bytes of the saved parameter file, with and without the embedding tables (the survey
    reports both), measured by writing the files."""
    flat = {k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()}
    encoder = {k: v for k, v in flat.items() if not is_embedding(k)}
    with tempfile.TemporaryDirectory() as tmp:
        full, rest = Path(tmp) / "all.safetensors", Path(tmp) / "rest.safetensors"
        save_file(flat, full)
        save_file(encoder, rest)
        return {"bytes": full.stat().st_size, "bytes_no_embeddings": rest.stat().st_size}


def write_json(path: Path, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
