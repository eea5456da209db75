"""Experiment configs: Python files with `get_config(arg)`, strict keys, command-line overrides."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections

GLUE_DIR_ENV = "JAXCOMPRESS_GLUE_DIR"


def finetune_defaults() -> ml_collections.ConfigDict:
    """Every key a fine-tuning run understands, with its default. Unknown keys are errors."""
    c = ml_collections.ConfigDict()
    c.model = "sentence-transformers/all-MiniLM-L6-v2"  # hub id or directory
    c.tokenizer = ""  # '' = the model's own
    c.task = "sst2"
    c.glue_dir = ""  # '' = $JAXCOMPRESS_GLUE_DIR, else the `nyu-mll/glue` hub dataset
    c.max_length = 128
    c.buckets = (8, 12, 16, 24, 32, 48, 64, 96, 128)  # padded lengths; one compiled program each
    c.seed = 0
    c.rng_impl = "rbg"  # dropout PRNG: "rbg" (fast on CPU) or "threefry2x32" (JAX's default)
    c.dtype = "float32"  # compute dtype (parameters stay float32): float32, bfloat16 or
    # float16 (float16 trains with dynamic loss scaling)
    # PoWER-BERT (jaxcompress/token_drop.py): per layer, the fraction of the padded length
    # whose word vectors (by attention received) the layer keeps; () = all of them.
    c.token_keep = ()
    c.remat = False  # recompute each layer's activations in the backward pass (saves memory)
    # Devices: a (data, fsdp, tensor) mesh; -1 takes the devices the other axes leave.
    # jaxcompress/sharding.py maps parameters to it. May change when a run resumes.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Multi-host (TPU pod slices, SLURM): call jax.distributed.initialize() first; each host
    # then reads its share of every batch, and only process 0 writes logs and run files.
    c.distributed = False
    c.dropout = 0.1  # hidden and attention dropout
    c.layerdrop = 0.0  # LayerDrop: probability of skipping each layer in a training step
    c.context_batches = 4  # train batches data-driven transforms measure (layer contributions)
    # Structure transforms applied to the loaded model, in order, e.g. ("low_rank(fraction=0.5)",)
    # (names and arguments: jaxcompress/transforms.py).
    c.transforms = ()

    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # '' = plain fine-tuning; else a model directory or hub id
    # loss = prediction * ((1 - alpha) * task + alpha * logit KD) + the weighted layer terms
    # below (each averaged over mapped layers); jaxcompress/objectives.py has the details.
    c.distill.alpha = 0.5
    c.distill.temperature = 2.0
    c.distill.logit_loss = "kl"  # "kl" (Hinton) or "mse" (Tang et al.); regression uses mse
    c.distill.prediction = 1.0  # 0 = intermediate layers only (TinyBERT's first stage)
    c.distill.hidden = 0.0  # layer outputs, TinyBERT MSE (projected if narrower) or cosine
    c.distill.hidden_loss = "mse"  # "mse" or "cosine" (DistilBERT)
    c.distill.embedding = 0.0  # embedding-layer output MSE (TinyBERT)
    c.distill.attention = 0.0  # per-head attention KL on mapped layers (TinyBERT, MobileBERT)
    c.distill.patient = 0.0  # normalised [CLS] distance on mapped layers but the last (BERT-PKD)
    c.distill.relation = 0.0  # last-layer self-relations (MiniLM)
    c.distill.relation_heads = 0  # 0: attention KL + value relation (MiniLM, equal head count);
    # > 0: query, key and value relations over this many relation heads (MiniLMv2; any shapes)
    c.distill.layer_map = "uniform"  # "uniform", "skip", "last" or teacher layers "2,4,6"
    c.distill.cache_logits = False  # precompute teacher logits once (logit-only objectives)

    # Quantization-aware training (jaxcompress/qat.py, quantized_model.py). Specs are QuantSpec
    # arguments as text, e.g. "bits=8", "bits=4,granularity='group',group_size=128",
    # "scheme='ternary'"; '' keeps those parameters float.
    c.quantize = ml_collections.ConfigDict()
    c.quantize.kernels = ""  # every dense kernel (low-rank factors and E x H projection too)
    c.quantize.embeddings = ""  # the embedding tables (the survey: they need more bits)
    c.quantize.rules = ()  # ("regex", "spec") pairs matched before the two above (per layer)
    c.quantize.activation_bits = 0  # inputs of every dense layer; 0 = float
    c.quantize.activation_ranges = "calibrated"  # or "dynamic" (each batch's own absmax)
    # BinaryBERT: start binary training by ternary weight splitting of the input model's
    # weights (those whose spec is binary); the input should be a ternary-trained model.
    c.quantize.binary_split = False
    c.quantize.calibration_batches = 8  # train batches the float model is calibrated on
    # Q-BERT: > 0 gives each encoder layer's kernels its own bit width (from `mixed_choices`,
    # group-wise scales of `mixed_group_size` rows) so that their average is at most this;
    # layers with a larger Hessian trace per parameter (Hutchinson's estimate from
    # `hessian_samples` probes of the task loss on `hessian_batches` train batches) get more.
    c.quantize.mixed_bits_budget = 0.0
    c.quantize.mixed_choices = (2, 3, 4, 8)
    c.quantize.mixed_group_size = 128
    c.quantize.hessian_samples = 16
    c.quantize.hessian_batches = 2

    # Unstructured pruning during training (jaxcompress/prune.py); steps are fractions of the run.
    c.prune = ml_collections.ConfigDict()
    c.prune.method = ""  # "", "magnitude" (Zhu & Gupta) or "movement" (Sanh et al.)
    c.prune.params = r"bert/encoder/.*/kernel"  # regex of the weights pruned (encoder dense)
    c.prune.sparsity = 0.0  # final fraction pruned (magnitude; hard movement)
    c.prune.initial_sparsity = 0.0
    c.prune.begin = 0.0  # fraction of training where the schedule starts
    c.prune.end = 0.0  # ... and reaches its final value; == begin: one-shot
    c.prune.frequency = 10  # steps between mask updates
    c.prune.scope = "layer"  # "layer" (each matrix alike) or "global" (one threshold)
    c.prune.movement = "hard"  # "hard" (top-k scores) or "soft" (sigmoid(score) > threshold)
    c.prune.threshold = 0.0  # soft movement: the final threshold on sigmoid(score)
    c.prune.score_l1 = 0.0  # soft movement: weight of the mean sigmoid(score) penalty
    c.prune.score_init = 0.0  # movement scores' initial value
    # Fixed masks from this model's zeros (lottery tickets: a pruned run's output, with
    # `model` the weights to rewind to); excludes `method`.
    c.prune.masks_from = ""

    # Early exit (jaxcompress/early_exit.py): a head after each of these layers (1-based;
    # () = off), trained on `targets` ("labels", "final": the model's own last-layer
    # prediction (FastBERT), "teacher": distill.teacher's), weighted "equal" or by "layer"
    # (PABEE); freeze_backbone trains the heads only (DeeBERT's second stage).
    c.early_exit = ml_collections.ConfigDict()
    c.early_exit.layers = ()
    c.early_exit.targets = "labels"
    c.early_exit.weighting = "equal"
    c.early_exit.freeze_backbone = True
    c.early_exit.pooling = "cls"  # what exit heads read: "cls" (DeeBERT) or "mean" of tokens

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.epochs = 1.0
    c.train.steps = -1  # > 0 overrides epochs
    c.train.examples = -1  # > 0: a fixed random subset (seeded by subset_seed) of the train set
    c.train.subset_seed = 0
    c.train.sort_window = 50  # group lengths within windows of this many batches; 1 = off
    c.train.lr = 5e-5
    c.train.warmup_ratio = 0.06
    c.train.weight_decay = 0.01
    c.train.clip_norm = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    # Split each batch into this many micro-batches whose gradients are averaged (weighted by
    # their examples) before one optimizer step: the batch's memory at 1/grad_accum.
    c.train.grad_accum = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.every_steps = 0  # 0 = only at the end

    # Persistent XLA compilation cache shared by runs ('' = off): each bucket shape of the train
    # step takes ~10 s to compile on CPU, which a cache pays once per machine, not once per run.
    c.compile_cache = "~/.cache/jaxcompress/xla"
    c.log_every = 50
    c.checkpoint_every = 500
    c.checkpoint_keep = 2
    return c


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
    """Raise on any key of `config` that `schema` does not have, suggesting the closest one."""
    for key, value in config.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown config key {key!r}{hint}")
        if isinstance(value, ml_collections.ConfigDict):
            try:
                check_keys(value, schema[key])
            except KeyError as e:
                raise KeyError(f"{key}.{e.args[0]}") from None


def merge(defaults: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
    """`defaults` updated by `config` (whose keys must all exist in `defaults`)."""
    check_keys(config, defaults)
    merged = ml_collections.ConfigDict(defaults.to_dict())
    merged.update(config.to_dict())
    merged.lock()
    return merged


def config_from_json(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved `config.json` back as a locked config (lists become tuples again)."""
    defaults = finetune_defaults()

    def restore(value, default):
        if isinstance(default, ml_collections.ConfigDict):
            return {k: restore(v, default[k]) if k in default else v for k, v in value.items()}
        return tuple(value) if isinstance(default, tuple) else value

    return merge(defaults, ml_collections.ConfigDict(restore(saved, defaults)))


def parse_override(text: str) -> tuple[str, object]:
    """`a.b=1e-4` -> ('a.b', 0.0001); values are Python literals, else plain strings."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Set dotted keys in place; unknown keys and wrong types raise."""
    for text in overrides:
        key, value = parse_override(text)
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                raise KeyError(f"unknown config key {key!r}")
            node = node[part]
        if parts[-1] not in node:
            close = difflib.get_close_matches(parts[-1], list(node.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown config key {key!r}{hint}")
        current = node[parts[-1]]
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        if current is not None and type(value) is not type(current):
            raise TypeError(f"config key {key!r} is {type(current).__name__}, got {value!r}")
        node[parts[-1]] = value


def run_config_file(spec: str):
    """`path/to/file.py[:arg]` -> (the module, its `get_config(arg)`)."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{file} has no get_config(arg) function")
    return module, module.get_config(arg)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the merged, locked config with overrides applied."""
    module, config = run_config_file(spec)
    defaults = getattr(module, "DEFAULTS", finetune_defaults)()
    merged = merge(defaults, config)
    apply_overrides(merged, overrides)
    return merged


def glue_dir(config: ml_collections.ConfigDict) -> str | None:
    """The local GLUE folder to read, or None for the hub."""
    return config.glue_dir or os.environ.get(GLUE_DIR_ENV) or None
