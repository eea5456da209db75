"""Experiment configs: Python files with `get_config(arg)`, strict keys, command-line overrides."""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from jaxcompress import assets
from jaxcompress.errors import UserError

GLUE_DIR_ENV = assets.GLUE_DIR_ENV


class ConfigError(UserError):
    """A config file or override the user must fix."""


class ConfigKeyError(ConfigError, KeyError):
    """An unknown config key (a KeyError whose message prints unquoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(ConfigError, TypeError):
    """An override whose value has the wrong type."""


class ConfigValueError(ConfigError, ValueError):
    """A malformed override or config argument."""


class ConfigFileError(ConfigError, FileNotFoundError):
    """A config file that does not exist."""


class ConfigFunctionError(ConfigError, AttributeError):
    """A config file without `get_config(arg)`."""


def finetune_defaults() -> ml_collections.ConfigDict:
    """Every key a fine-tuning run understands, with its default. Unknown keys are errors."""
    c = ml_collections.ConfigDict()
    c.model = "sentence-transformers/all-MiniLM-L6-v2"  # hub id or directory
    c.tokenizer = ""  # '' = the model's own
    c.task = "sst2"
    c.glue_dir = ""  # '' = $JAXCOMPRESS_GLUE_DIR or jaxcompress.toml's, else the hub
    c.max_length = 128
    # Padded lengths, one compiled program each; () = per device (`device_buckets`): on CPU a
    # fine grid up to max_length, on GPU and TPU a quarter, half and all of it.
    c.buckets = ()
    c.seed = 0
    c.rng_impl = "rbg"  # dropout PRNG: "rbg" (fast on CPU) or "threefry2x32" (JAX's default)
    # Compute dtype (parameters stay float32): "auto" (bfloat16 on GPU and TPU, float32 on
    # CPU, resolved when a run starts), float32, bfloat16 or float16 (dynamic loss scaling).
    c.dtype = "auto"
    # PoWER-BERT (jaxcompress/compress/dynamic/token_drop.py): per layer, the fraction of the
    # padded length whose word vectors (by attention received) the layer keeps; () = all of them.
    c.token_keep = ()
    c.remat = False  # recompute each layer's activations in the backward pass (saves memory)
    # A uniform, unshared encoder as one scan over its layers (one layer compiled, not each);
    # parameters stay stored per layer. Not for runs whose transforms change layer shapes.
    c.scan_layers = False
    # Devices: a (data, fsdp, tensor) mesh; -1 takes the devices the other axes leave.
    # jaxcompress/train/sharding.py maps parameters to it. May change when a run resumes.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Multi-host (TPU pod slices, SLURM): call jax.distributed.initialize() first; each host
    # then reads its share of every batch, and only process 0 writes logs and run files.
    c.distributed = False
    c.dropout = 0.1  # hidden and attention dropout
    c.layerdrop = 0.0  # LayerDrop: probability of skipping each layer in a training step
    c.context_batches = 4  # train batches data-driven transforms measure (layer contributions)
    # Structure transforms applied to the loaded model, in order, e.g. ("low_rank(fraction=0.5)",)
    # (names and arguments: jaxcompress/compress/transforms.py).
    c.transforms = ()

    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # '' = plain fine-tuning; else a model directory or hub id
    # loss = prediction * ((1 - alpha) * task + alpha * logit KD) + the weighted layer terms
    # below (each averaged over mapped layers); jaxcompress/compress/distill/objective.py has
    # the details.
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

    # Quantization-aware training (jaxcompress/compress/quant/qat.py, activations.py). Specs are
    # QuantSpec arguments as text, e.g. "bits=8", "bits=4,granularity='group',group_size=128",
    # "scheme='ternary'"; '' keeps those parameters float.
    c.quantize = ml_collections.ConfigDict()
    c.quantize.kernels = ""  # every dense kernel (low-rank factors and E x H projection too)
    c.quantize.embeddings = ""  # the embedding tables (the survey: they need more bits)
    c.quantize.rules = ()  # ("regex", "spec") pairs matched before the two above (per layer)
    c.quantize.activation_bits = 0  # inputs of every dense layer; 0 = float
    c.quantize.activation_ranges = "calibrated"  # or "dynamic" (each batch's own absmax)
    # "symmetric" (the integer grid of activation_bits) or "fp8" (e4m3, activation_bits = 8)
    c.quantize.activation_scheme = "symmetric"
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

    # Unstructured pruning during training (jaxcompress/compress/prune/unstructured.py); steps
    # are fractions of the run.
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
    c.prune.score_lr = 0.0  # movement scores' peak learning rate (Sanh et al.: 1e-2); 0 = train.lr
    # How scores train: "adam" (as the weights, at score_lr) or "sum" (S = -score_lr * the sum
    # of dL/dW' * W over steps, the paper's definition; Adam divides each weight's size out)
    c.prune.score_update = "adam"
    # The model that `model` was fine-tuned from (hub id or directory): scores start at each
    # weight's movement away from zero in that fine-tune, |W| - |W_from| (Adam-trained scores
    # grow as |W| does), instead of a short run's noisy first gradients. '' = score_init.
    c.prune.scores_from = ""
    # Scores also start at this multiple of |W_from| (of |W| without scores_from): a magnitude
    # prior beside the movement, which alone would rank large, unmoved weights last.
    c.prune.score_magnitude = 0.0
    # Fixed masks from this model's zeros (lottery tickets: a pruned run's output, with
    # `model` the weights to rewind to); excludes `method`.
    c.prune.masks_from = ""

    # Gradual cross-layer sharing (jaxcompress/compress/gradual_sharing.py): between `begin`
    # and `end` (fractions of training) each layer's weights blend linearly into the mean of
    # its group's; from `end` on the layers of a group are one (ALBERT's sharing, reached
    # while training instead of imposed at once; `share_layers` then stores each group once).
    c.share = ml_collections.ConfigDict()
    c.share.groups = ""  # "" = off, "all" (one shared layer) or "every:K"
    c.share.params = r"bert/encoder/layer/\d+/.*"  # regex of the per-layer leaves shared
    c.share.begin = 0.0
    c.share.end = 0.0

    # Early exit (jaxcompress/compress/dynamic/early_exit.py): a head after each of these layers
    # (1-based; () = off), trained on `targets` ("labels", "final": the model's own last-layer
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
    c.eval.examples = -1  # > 0: at most this many examples (the first) of each eval split

    # Persistent XLA compilation cache shared by runs ('' = off): each bucket shape of the train
    # step takes ~10 s to compile on CPU, which a cache pays once per machine, not once per run.
    c.compile_cache = "~/.cache/jaxcompress/xla"
    # Compile every train program the run will use (one per padded length) before the first
    # step, in parallel threads: "auto" (on GPU and TPU, where each takes tens of seconds),
    # "on" or "off" (each compiles when its first batch comes).
    c.precompile = "auto"
    c.log_every = 50
    c.checkpoint_every = 500
    c.checkpoint_keep = 2
    return c


def check_keys(
    config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = ""
) -> None:
    """Raise on any key of `config` that `schema` does not have, suggesting the closest one."""
    for key, value in config.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigKeyError(f"unknown config key {prefix + key!r}{hint}")
        if isinstance(value, ml_collections.ConfigDict):
            check_keys(value, schema[key], f"{prefix}{key}.")


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
        raise ConfigValueError(f"override {text!r} must look like key=value")
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
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigKeyError(f"override {text!r}: unknown config key {key!r}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigKeyError(f"override {text!r}: unknown config key {key!r}")
        if parts[-1] not in node:
            close = difflib.get_close_matches(parts[-1], list(node.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigKeyError(f"override {text!r}: unknown config key {key!r}{hint}")
        current = node[parts[-1]]
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        if current is not None and type(value) is not type(current):
            raise ConfigTypeError(
                f"override {text!r}: config key {key!r} is {type(current).__name__}, "
                f"got {type(value).__name__} {value!r}"
            )
        node[parts[-1]] = value


def run_config_file(spec: str):
    """`path/to/file.py[:arg]` -> (the module, its `get_config(arg)`)."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigFileError(
            f"config file {file} does not exist (the form is path/to/config.py[:arg])"
        )
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{file}: line {e.lineno}: syntax error: {e.msg}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigFunctionError(f"{file} has no get_config(arg) function")
    try:
        return module, module.get_config(arg)
    except (ValueError, KeyError) as e:  # the argument's mistakes, e.g. an unknown flag
        message = e.args[0] if e.args else type(e).__name__
        raise ConfigValueError(f"{spec}: {message}") from None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the merged, locked config with overrides applied."""
    module, config = run_config_file(spec)
    defaults = getattr(module, "DEFAULTS", finetune_defaults)()
    try:
        merged = merge(defaults, config)
    except ConfigKeyError as e:
        raise ConfigKeyError(f"{spec.partition(':')[0]}: {e}") from None
    apply_overrides(merged, overrides)
    return merged


def glue_dir(config: ml_collections.ConfigDict) -> str | None:
    """The local GLUE folder to read: the config's `glue_dir`, else `$JAXCOMPRESS_GLUE_DIR`,
    else `jaxcompress.toml`'s (see `jaxcompress.assets`); None for the hub."""
    if config.glue_dir:
        return config.glue_dir
    found = assets.glue_dir()
    return None if found is None else str(found)


# What each fine-tuning key may hold: (dotted key, test, the allowed values in words).
# `validate` checks them all before a run writes anything; keys a config lacks are skipped.
def _choice(*options: str) -> tuple[Callable[[object], bool], str]:
    return (lambda v: v in options), " or ".join(repr(o) for o in options)


def _range(low: float, high: float, low_open: bool = False, high_open: bool = False):
    def test(v) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return not isinstance(v, bool) and above and below

    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return test, f"a number in {text}"


def _at_least(low: float, integer: bool = True):
    kind = "an integer" if integer else "a number"
    return (lambda v: not isinstance(v, bool) and v >= low), f"{kind} >= {low:g}"


def _positive(integer: bool = False):
    kind = "an integer" if integer else "a number"
    return (lambda v: not isinstance(v, bool) and v > 0), f"{kind} > 0"


def _each(test_and_text, empty_ok: bool = True):
    test, text = test_and_text
    words = f"a tuple of {text.removeprefix('a ').removeprefix('an ')}s"
    return (lambda v: (empty_ok or len(v) > 0) and all(test(x) for x in v)), words


_FRACTION = _range(0.0, 1.0, high_open=True)
_WEIGHT = _at_least(0.0, integer=False)
_LAYER_MAP = (
    lambda v: (
        v in ("uniform", "skip", "last")
        or all(p.strip().isdigit() and int(p) >= 1 for p in v.split(","))
    ),
    "'uniform', 'skip', 'last' or teacher layers like '2,4,6'",
)
_ALL_OR_COUNT = (lambda v: v == -1 or v >= 1, "-1 (all of them) or an integer >= 1")

VALUE_CHECKS: tuple[tuple[str, Callable[[object], bool], str], ...] = tuple(
    (key, *check)
    for key, check in (
        ("max_length", _positive(integer=True)),
        ("buckets", _each(_positive(integer=True))),
        ("precompile", _choice("auto", "on", "off")),
        ("seed", _at_least(0)),
        ("rng_impl", _choice("rbg", "unsafe_rbg", "threefry2x32")),
        ("dtype", _choice("auto", "float32", "bfloat16", "float16")),
        ("token_keep", _each(_range(0.0, 1.0, low_open=True))),
        ("mesh.data", (lambda v: v == -1 or v >= 1, "-1 (the devices left) or >= 1")),
        ("mesh.fsdp", (lambda v: v == -1 or v >= 1, "-1 (the devices left) or >= 1")),
        ("mesh.tensor", (lambda v: v == -1 or v >= 1, "-1 (the devices left) or >= 1")),
        ("dropout", _FRACTION),
        ("layerdrop", _FRACTION),
        ("context_batches", _at_least(1)),
        ("distill.alpha", _range(0.0, 1.0)),
        ("distill.temperature", _positive()),
        ("distill.logit_loss", _choice("kl", "mse")),
        ("distill.prediction", _WEIGHT),
        ("distill.hidden", _WEIGHT),
        ("distill.hidden_loss", _choice("mse", "cosine")),
        ("distill.embedding", _WEIGHT),
        ("distill.attention", _WEIGHT),
        ("distill.patient", _WEIGHT),
        ("distill.relation", _WEIGHT),
        ("distill.relation_heads", _at_least(0)),
        ("distill.layer_map", _LAYER_MAP),
        ("quantize.activation_bits", _range(0, 32)),
        ("quantize.activation_ranges", _choice("calibrated", "dynamic")),
        ("quantize.activation_scheme", _choice("symmetric", "fp8")),
        ("quantize.calibration_batches", _at_least(1)),
        ("quantize.mixed_bits_budget", _WEIGHT),
        ("quantize.mixed_choices", _each(_range(1, 32))),
        ("quantize.mixed_group_size", _at_least(1)),
        ("quantize.hessian_samples", _at_least(1)),
        ("quantize.hessian_batches", _at_least(1)),
        ("prune.method", _choice("", "magnitude", "movement")),
        ("prune.sparsity", _FRACTION),
        ("prune.initial_sparsity", _FRACTION),
        ("prune.begin", _range(0.0, 1.0)),
        ("prune.end", _range(0.0, 1.0)),
        ("prune.frequency", _at_least(1)),
        ("prune.scope", _choice("layer", "global")),
        ("prune.movement", _choice("hard", "soft")),
        ("prune.threshold", _FRACTION),
        ("prune.score_l1", _WEIGHT),
        ("prune.score_lr", _WEIGHT),
        ("prune.score_update", _choice("adam", "sum")),
        (
            "share.groups",
            (
                lambda v: isinstance(v, str) and bool(re.fullmatch(r"|all|every:[1-9]\d*", v)),
                "'' (off), 'all' or 'every:K' with K >= 1",
            ),
        ),
        ("share.begin", _range(0.0, 1.0)),
        ("share.end", _range(0.0, 1.0)),
        ("early_exit.layers", _each(_at_least(1))),
        ("early_exit.targets", _choice("labels", "final", "teacher")),
        ("early_exit.weighting", _choice("equal", "layer")),
        ("early_exit.pooling", _choice("cls", "mean")),
        ("train.batch_size", _positive(integer=True)),
        ("train.examples", _ALL_OR_COUNT),
        ("train.sort_window", _at_least(1)),
        ("train.lr", _positive()),
        ("train.warmup_ratio", _range(0.0, 1.0)),
        ("train.weight_decay", _WEIGHT),
        ("train.clip_norm", _positive()),
        ("train.b1", _FRACTION),
        ("train.b2", _FRACTION),
        ("train.eps", _WEIGHT),
        ("train.grad_accum", _at_least(1)),
        ("eval.batch_size", _positive(integer=True)),
        ("eval.every_steps", _at_least(0)),
        ("eval.examples", _ALL_OR_COUNT),
        ("log_every", _at_least(1)),
        ("checkpoint_every", _at_least(1)),
        (
            "checkpoint_keep",
            (
                lambda v: v >= 2,
                "an integer >= 2 (a corrupt latest checkpoint falls back to the one before)",
            ),
        ),
    )
)

_MISSING = object()


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def _bad(key: str, value, allowed: str) -> ConfigValueError:
    return ConfigValueError(
        f"config key {key}={value!r} is out of range: it must be {allowed}; "
        f"fix it in the config file or with --set {key}=..."
    )


def _on_accelerator(backend: str | None) -> bool:
    if backend is None:
        import jax  # only when asked: configs load without initialising a backend

        backend = jax.default_backend()
    return backend in ("gpu", "tpu", "cuda", "rocm")


def compute_dtype(name: str, backend: str | None = None) -> str:
    """The compute dtype a config's `dtype` names.

    Args:
      name: the config's `dtype`; "auto" is bfloat16 on GPU and TPU and float32 on CPU.
      backend: the JAX backend to resolve for; None is JAX's default backend.

    Returns:
      A dtype name other than "auto".
    """
    if name != "auto":
        return name
    return "bfloat16" if _on_accelerator(backend) else "float32"


_FINE_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)


def device_buckets(max_length: int, backend: str | None = None) -> tuple[int, ...]:
    """The padded lengths a config's `buckets=()` stands for.

    On CPU a program compiles in seconds and every padded token costs its share of the step,
    so the lengths are a fine grid; on GPU and TPU a program compiles in tens of seconds and
    short rows leave the chip idle anyway, so there are three.

    Args:
      max_length: the longest sequence (tokens); always the last length.
      backend: the JAX backend to choose for; None is JAX's default backend.

    Returns:
      Increasing padded lengths: on CPU the fine grid below `max_length` (8, 12, 16, 24, ...)
      then `max_length`; on GPU and TPU a quarter, half and all of `max_length` (at least 8).
    """
    if _on_accelerator(backend):
        return tuple(sorted({max(max_length // 4, 8), max(max_length // 2, 8), max_length}))
    return tuple(b for b in _FINE_BUCKETS if b < max_length) + (max_length,)


def buckets_of(config: ml_collections.ConfigDict, backend: str | None = None) -> tuple[int, ...]:
    """A config's padded lengths: its `buckets`, or `device_buckets` of its `max_length`.

    Args:
      config: a fine-tuning config (`buckets`, `max_length`).
      backend: the JAX backend to choose for; None is JAX's default backend.

    Returns:
      Increasing padded lengths.
    """
    return tuple(sorted(config.buckets)) or device_buckets(config.max_length, backend)


def with_device_defaults(
    config: ml_collections.ConfigDict, backend: str | None = None
) -> ml_collections.ConfigDict:
    """A copy of `config` with its per-device settings resolved, so that what a run saves
    and compares is what it runs: `dtype` (`compute_dtype`), `buckets` (`buckets_of`) and
    `precompile` ("on" or "off").

    Args:
      config: a fine-tuning config; it is not changed.
      backend: the JAX backend to resolve for; None is JAX's default backend.

    Returns:
      The resolved copy.
    """
    resolved = copy.deepcopy(config)
    resolved.dtype = compute_dtype(config.dtype, backend)
    resolved.buckets = buckets_of(config, backend)
    if config.precompile == "auto":
        resolved.precompile = "on" if _on_accelerator(backend) else "off"
    return resolved


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise UserError on the first value a run cannot use (`VALUE_CHECKS`, then the keys
    that constrain each other), naming the key, the value, what is allowed and the fix."""
    for key, test, allowed in VALUE_CHECKS:
        value = _lookup(config, key)
        if value is _MISSING:
            continue
        try:
            ok = bool(test(value))
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise _bad(key, value, allowed)
    train = _lookup(config, "train")
    if train is not _MISSING:
        steps, epochs = train.get("steps", -1), train.get("epochs", 1.0)
        if not steps > 0 and not epochs > 0:
            raise ConfigValueError(
                f"config key train.epochs={epochs!r} is out of range: it must be > 0 unless "
                f"train.steps > 0 (train.steps={steps!r}); set --set train.epochs=1.0 or "
                "--set train.steps=N"
            )
        size, accum = train.get("batch_size", 1), train.get("grad_accum", 1)
        if size % accum:
            raise ConfigValueError(
                f"config key train.grad_accum={accum!r} must divide train.batch_size={size!r} "
                "into equal micro-batches; choose a divisor, e.g. --set train.grad_accum=1"
            )
    buckets, length = _lookup(config, "buckets"), _lookup(config, "max_length")
    if buckets not in (_MISSING, ()) and length is not _MISSING and max(buckets) < length:
        raise ConfigValueError(
            f"config key buckets={tuple(buckets)!r} has no padded length for max_length="
            f"{length!r} tokens: add {length} to buckets, or set --set buckets=() for the "
            "device's default"
        )
    share, prune = _lookup(config, "share"), _lookup(config, "prune")
    if _MISSING not in (share, prune) and share.get("groups") and prune.get("method"):
        raise ConfigValueError(
            f"config keys share.groups={share.groups!r} and prune.method={prune.method!r} "
            "conflict: pruning masks each layer's copy of a shared weight differently, which "
            "undoes the sharing; share in one stage and prune in a later one"
        )
    for name, at_once in (("prune", "prunes"), ("share", "shares")):
        section = _lookup(config, name)
        if section is not _MISSING and section.get("begin", 0.0) > section.get("end", 0.0):
            raise ConfigValueError(
                f"config key {name}.begin={section.begin!r} is after {name}.end="
                f"{section.end!r}: the schedule must start before it ends (begin == end "
                f"{at_once} in one shot); set {name}.end >= {name}.begin"
            )
