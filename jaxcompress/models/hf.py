"""Hugging Face checkpoints <-> (BertConfig, params), both ways."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxcompress import assets
from jaxcompress.errors import UserError
from jaxcompress.models.bert import BertConfig, abstract_params, unshare_layers

log = logging.getLogger(__name__)

MODEL_ROOT_ENV = assets.MODEL_ROOT_ENV
_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "initializer_range",
    "pad_token_id",
)
# Keys of config.json without which the weights' shapes are unknown.
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model directory or hub id that cannot be found."""


class ModelFormatError(UserError, ValueError):
    """A model directory whose files cannot be read as a BERT checkpoint."""


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory for a model: the path itself, `<model_root>/<name>`, or the hub.

    `model_root` (`$JAXCOMPRESS_MODEL_ROOT` or `jaxcompress.toml`, see `jaxcompress.assets`) is
    how offline machines map hub ids to local copies: the id's last component
    (`sentence-transformers/all-MiniLM-L6-v2` -> `all-MiniLM-L6-v2`) is looked up there.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    root = assets.model_root()
    if root:
        for candidate in (root / name, root / name.rsplit("/", 1)[-1]):
            if candidate.is_dir():
                return candidate
    where = f"model_root {root}" if root else f"no model_root ({assets.how_to_set('model_root')})"
    # `runs/x` could be a hub id `org/name`, but a local folder `runs/` says it is a path.
    looks_local = (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or path.exists()
        or (path.parent != Path(".") and path.parent.is_dir())
    )
    if looks_local:
        raise ModelNotFoundError(
            f"model directory {name!r} does not exist (expected config.json and "
            f"model.safetensors there; {where})"
        )
    known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root and root.is_dir() else []
    if known:
        where += f" holds {', '.join(known)}"
    try:
        assets.require_hub(f"model {name!r} (not a directory; {where})", "model_root")
    except UserError as e:
        raise ModelNotFoundError(str(e)) from None
    from huggingface_hub import snapshot_download

    try:
        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *_TOKENIZER_FILES]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # network, auth or unknown id: say what to set instead
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"could not find model {name!r} locally ({where}) or on the Hugging Face hub "
            f"({reason}); pass a model directory or {assets.how_to_set('model_root')}"
        ) from e


def config_from_hf(hf: dict, num_labels: int) -> BertConfig:
    """Our config from a Hugging Face `config.json` dict."""
    if hf.get("model_type", "bert") != "bert":
        raise ModelFormatError(f"model_type {hf.get('model_type')!r} is not BERT")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ModelFormatError("only absolute position embeddings are supported")
    fields = {k: hf[k] for k in _HF_FIELDS if k in hf}
    pruned = {int(k): set(v) for k, v in (hf.get("pruned_heads") or {}).items()}
    if pruned:
        heads = hf["num_attention_heads"]
        fields["heads_per_layer"] = tuple(
            heads - len(pruned.get(i, ())) for i in range(hf["num_hidden_layers"])
        )
        fields["head_size"] = hf["hidden_size"] // heads
    return BertConfig(**fields, num_labels=num_labels)


def _hf_key(flax_path: str) -> tuple[str, bool]:
    """The HF weight name for a flattened flax path, and whether it is transposed."""
    parts = flax_path.split("/")
    leaf = parts[-1]
    if leaf == "kernel":
        return ".".join(parts[:-1]) + ".weight", True
    if leaf == "scale":
        return ".".join(parts[:-1]) + ".weight", False
    if leaf == "bias":
        return ".".join(parts), False
    return ".".join(parts) + ".weight", False  # embedding tables


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays; a missing or unreadable file is a user error naming it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise ModelNotFoundError(f"{path} does not exist") from None
        raise ModelFormatError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated: "
            "copy or download it again"
        ) from None


def read_json(path: Path) -> dict:
    """A JSON object from a model file; bad JSON is a user error naming the file and line."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(
            f"{path}: line {e.lineno}: not valid JSON ({e.msg}); restore the file"
        ) from None
    except UnicodeDecodeError:
        raise ModelFormatError(f"{path} is not UTF-8 text; restore the file") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return load_safetensors(single)
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index} has no 'weight_map' object; restore the file")
        shards = sorted(set(weight_map.values()))
        return {k: v for s in shards for k, v in load_safetensors(directory / s).items()}
    pickled = directory / "pytorch_model.bin"
    if pickled.exists():
        if not allow_pickle:
            # No command offers allow_pickle: the fix is a safetensors copy of the weights.
            raise ModelFormatError(
                f"{pickled} is a pickled PyTorch checkpoint, which can execute code when "
                "loaded, so it is not read; convert it to model.safetensors in the same "
                "folder (safetensors.torch.save_file of its state dict)"
            )
        import torch

        state = torch.load(pickled, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise ModelNotFoundError(
        f"no model.safetensors (or model.safetensors.index.json) in {directory}"
    )


def _normalise_keys(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give every key the `bert.` prefix and modern LayerNorm names (gamma/beta -> weight/bias)."""
    out = {}
    for key, value in weights.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        if not key.startswith(("bert.", "classifier.", "cls.")):
            key = "bert." + key
        out[key] = value
    return out


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    head_seed: int = 0,
    allow_pickle: bool = False,
    **overrides,
) -> tuple[BertConfig, dict]:
    """Load a Hugging Face BERT directory (or hub id) as `(config, params)`.

    Works with or without the `bert.` prefix and with or without a classifier.

    Args:
      name_or_path: a model directory, or a hub id looked up under `model_root` or
        downloaded (`resolve_model_dir`).
      num_labels: None keeps the checkpoint's head (or none); a number asks for that head,
        freshly initialised when the checkpoint has none.
      head_seed: the seed of a freshly initialised head.
      allow_pickle: read a pickled `pytorch_model.bin` when there are no safetensors
        (pickles can execute code when loaded).
      **overrides: config fields to replace, e.g. `dtype="bfloat16"`,
        `hidden_dropout_prob=0.0`.

    Returns:
      `(config, params)`: the `BertConfig` and the parameter tree of `Bert(config)`.
    """
    directory = resolve_model_dir(name_or_path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise ModelNotFoundError(f"no config.json in {directory}")
    hf = read_json(config_file)
    missing_keys = [k for k in _REQUIRED_FIELDS if k not in hf]
    if missing_keys:
        raise ModelFormatError(
            f"{config_file} lacks keys {missing_keys}; restore the file from the model's source"
        )
    weights = _normalise_keys(_read_weights(directory, allow_pickle))
    has_head = "classifier.weight" in weights
    if num_labels is None:
        num_labels = weights["classifier.weight"].shape[0] if has_head else 0
    try:
        config = config_from_hf(hf, num_labels).replace(**overrides)
    except ModelFormatError as e:
        raise ModelFormatError(f"{config_file}: {e}") from None

    fresh = abstract_params(config)
    params, missing = {}, []
    for path, spec in flatten_dict(fresh, sep="/").items():
        key, transpose = _hf_key(path)
        if key not in weights:
            missing.append(key)
            continue
        value = weights.pop(key)
        value = value.T if transpose else value
        if value.shape != spec.shape:
            raise ModelFormatError(
                f"{directory}: weight {key} has shape {value.shape}, but parameter {path} "
                f"of the config needs {spec.shape}"
            )
        params[path] = jnp.asarray(value, jnp.float32)
    head_missing = [k for k in missing if k.startswith("classifier.")]
    if set(missing) - set(head_missing):
        raise ModelFormatError(
            f"{directory}: weights missing for {sorted(set(missing) - set(head_missing))}"
        )
    if head_missing:
        if has_head:
            raise ValueError(
                f"{directory}: classifier weights do not match num_labels={num_labels}"
            )
        log.info("initialising a fresh %d-label head (seed %d)", num_labels, head_seed)
        std = config.initializer_range
        key = jax.random.key(head_seed)
        params["classifier/kernel"] = std * jax.random.normal(key, (config.hidden_size, num_labels))
        params["classifier/bias"] = jnp.zeros((num_labels,))
    ignored = sorted(k for k in weights if not k.endswith("position_ids"))
    if ignored:
        log.info("ignored %d checkpoint weights not used by the model: %s", len(ignored), ignored)
    return config, unflatten_dict(params, sep="/")


def dense_equivalent(config: BertConfig, params: dict) -> tuple[BertConfig, dict]:
    """The same function as a uniform BERT that Hugging Face can load.

    Factorized embeddings and low-rank kernels are multiplied out, shared layers copied to
    every layer, and pruned heads and FFN neurons padded back with zeros: a zero neuron adds
    nothing, and a head with zero query, key, value and output weights adds exactly nothing.
    (transformers 5 dropped `pruned_heads`, so zero padding is the portable form.)
    """
    config, params = unshare_layers(config, params)
    out = {k: np.asarray(v, np.float32) for k, v in flatten_dict(params, sep="/").items()}
    width = config.intermediate_size
    for path in [p for p in out if p.endswith("/kernel_a")]:
        base = path[: -len("/kernel_a")]
        out[base + "/kernel"] = out.pop(path) @ out.pop(base + "/kernel_b")
    if config.embedding_size is not None:
        proj = out.pop("bert/embeddings/embedding_projection")
        out["bert/embeddings/word_embeddings"] = out["bert/embeddings/word_embeddings"] @ proj
    d = config.attention_head_size
    for i in range(config.num_hidden_layers):
        layer = f"bert/encoder/layer/{i}/"
        _pad_width(out, [layer + "intermediate/dense"], layer + "output/dense", width)
        qkv = [layer + f"attention/self/{name}" for name in ("query", "key", "value")]
        _pad_width(out, qkv, layer + "attention/output/dense", config.num_attention_heads * d)
    dense = config.replace(
        embedding_size=None,
        attention_groups=None,
        ffn_groups=None,
        low_rank=(),
        intermediate_per_layer=None,
        heads_per_layer=None,
        head_size=None,
    )
    return dense, unflatten_dict({k: jnp.asarray(v) for k, v in out.items()}, sep="/")


def _pad_width(flat: dict, producers: list[str], consumer: str, width: int) -> None:
    """Zero-pad the output columns of `producers` and the input rows of `consumer` to `width`."""
    for name in producers:
        pad = width - flat[name + "/kernel"].shape[1]
        flat[name + "/kernel"] = np.pad(flat[name + "/kernel"], ((0, 0), (0, pad)))
        flat[name + "/bias"] = np.pad(flat[name + "/bias"], (0, pad))
    pad = width - flat[consumer + "/kernel"].shape[0]
    flat[consumer + "/kernel"] = np.pad(flat[consumer + "/kernel"], ((0, pad), (0, 0)))


def hf_config_dict(config: BertConfig, label_names: Sequence[str] = ()) -> dict:
    """A `config.json` for `transformers.BertForSequenceClassification`.

    `label_names` (one per output, e.g. a GLUE task's) name the labels; otherwise they are
    LABEL_0, LABEL_1, ..."""
    hf = {k: getattr(config, k) for k in _HF_FIELDS}
    hf.update(model_type="bert", architectures=["BertForSequenceClassification"])
    if config.num_labels > 0:
        names = list(label_names)
        if len(names) != config.num_labels:
            names = [f"LABEL_{i}" for i in range(config.num_labels)]
        hf["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf["label2id"] = {name: i for i, name in enumerate(names)}
    if config.num_labels == 1:
        hf["problem_type"] = "regression"
    return hf


def copy_tokenizer(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the tokenizer files a model directory needs to be self-contained."""
    for name in _TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, Path(target) / name)


def save_pretrained(
    config: BertConfig,
    params: dict,
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    label_names: Sequence[str] = (),
) -> Path:
    """Write a Hugging Face directory (config.json + model.safetensors), atomically.

    Compressed shapes are exported as their dense equivalent (see `dense_equivalent`).

    Args:
      config: the model's `BertConfig`; needs head_size * num_attention_heads == hidden_size.
      params: the model's parameters.
      path: the directory to write; an existing one is replaced.
      tokenizer_dir: a directory whose tokenizer files are copied alongside, if given.
      label_names: one name per output, written as config.json's id2label / label2id.

    Returns:
      The written directory's path.
    """
    if config.attention_head_size * config.num_attention_heads != config.hidden_size:
        raise ValueError(
            "Hugging Face BERT needs head_size * num_attention_heads == hidden_size; got "
            f"{config.attention_head_size} * {config.num_attention_heads} != {config.hidden_size}"
        )
    dense_config, dense_params = dense_equivalent(config, params)
    tensors = {}
    for flax_path, value in flatten_dict(dense_params, sep="/").items():
        key, transpose = _hf_key(flax_path)
        value = np.asarray(value, np.float32)
        tensors[key] = np.ascontiguousarray(value.T if transpose else value)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the folder gets the umask's mode (mkdtemp's is 0700).
    staging = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        hf = hf_config_dict(dense_config, label_names)
        (staging / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
