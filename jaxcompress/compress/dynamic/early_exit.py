"""Early exit (DeeBERT, FastBERT, PABEE): exit heads, their losses, exit policies, and batched
inference that stops computing for the examples that have exited.

An exit after layer n (1-based: n layers run) is a pooler + classifier on that layer's [CLS]
vector, like the model's own head, whose weights initialise it. Exit heads live in the
trainable tree under `EXITS` ("exits"/"<n>"); the model's own head is the exit after the
last layer. Training (`make_exit_loss`):
- targets "labels": cross-entropy of every exit (DeeBERT's off-ramps; PABEE jointly);
- targets "final": KL from the model's own (last-layer) prediction, FastBERT's
  self-distillation; "teacher": KL from `distill.teacher`'s logits;
- weighting "equal", or "layer": exit n weighs n (PABEE);
- freeze_backbone: only the exit heads learn (DeeBERT's second stage, FastBERT); otherwise
  the last layer's head is trained with the task loss beside them.

Policies (`Policy`): "entropy" exits when the prediction's entropy (nats) is below the
threshold (DeeBERT); "patience" exits when the last k exits (consecutive) predicted the same
class (PABEE with patience k - 1); "budget" exits at the first exit at or after layer k.
`ExitRunner` runs layer by layer and, after each exit, regroups the batch to the examples
still running (padded up to a power of two, so few shapes compile), so the time falls with
the layers skipped, not only the counted layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxcompress.compress.distill import losses as distill
from jaxcompress.compress.distill.objective import EXITS, Batch, LossFn, forward, task_loss
from jaxcompress.compress.dynamic import token_drop
from jaxcompress.models import artefact
from jaxcompress.models.bert import (
    CLASSES,
    EMBED,
    HIDDEN,
    Bert,
    BertConfig,
    Embeddings,
    Layer,
    Linear,
)

TARGETS = ("labels", "final", "teacher")
WEIGHTINGS = ("equal", "layer")
POLICIES = ("entropy", "patience", "budget")
POOLINGS = ("cls", "mean")
EXITS_FILE = "early_exit.json"


class ExitHead(nn.Module):
    """Pooler (dense + tanh) and classifier, as in HF's BERT head, on the [CLS] vector
    ("cls") or on the mean of the real tokens' vectors ("mean")."""

    config: BertConfig
    pooling: str = "cls"

    @nn.compact
    def __call__(self, x_BxLxH: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        cfg = self.config
        if self.pooling == "cls":
            summary_BxH = x_BxLxH[:, 0]
        else:
            weights = mask_BxL.astype(x_BxLxH.dtype)[..., None]
            summary_BxH = jnp.sum(x_BxLxH * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)
        pooled = jnp.tanh(Linear(cfg, cfg.hidden_size, (EMBED, HIDDEN), name="pooler")(summary_BxH))
        head = Linear(cfg, cfg.num_labels, (HIDDEN, CLASSES), name="classifier")
        return head(pooled).astype(jnp.float32)


def check_layers(config: BertConfig, layers: Sequence[int]) -> tuple[int, ...]:
    """Exit positions as a sorted tuple; each in 1 .. num_hidden_layers - 1 (the last layer's
    exit is the model's own head)."""
    layers = tuple(sorted(int(n) for n in layers))
    last = config.num_hidden_layers
    if not layers or any(not 1 <= n < last for n in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"early_exit.layers must be distinct layers in 1..{last - 1}: {layers}")
    if config.num_labels < 2:
        raise ValueError("early exit needs a classification head (num_labels >= 2)")
    return layers


def model_head(params: dict) -> dict:
    """The model's own head in `ExitHead`'s layout."""
    return {"pooler": params["bert"]["pooler"]["dense"], "classifier": params["classifier"]}


def init_exits(config: BertConfig, params: dict, layers: Sequence[int]) -> dict:
    """An exit head after each of `layers`, each a copy of the model's own head."""
    head = model_head(params)
    return {str(n): jax.tree.map(jnp.array, head) for n in check_layers(config, layers)}


def split_exits(params: dict) -> tuple[dict, dict]:
    """The params without exit heads, and the exit heads by layer (str)."""
    return {k: v for k, v in params.items() if k != EXITS}, params.get(EXITS, {})


@dataclasses.dataclass(frozen=True)
class ExitSpec:
    """A checked `early_exit` section.

    Attributes:
      layers: the layers followed by an exit head (each in 1 .. layers - 1).
      targets: what exits learn: 'labels', 'final' (the model's own prediction) or 'teacher'.
      weighting: 'equal', or 'layer' (exit n weighs n, PABEE).
      freeze_backbone: train the exit heads only.
      pooling: what exit heads read: 'cls' or 'mean' of the tokens.
    """

    layers: tuple[int, ...]
    targets: str = "labels"
    weighting: str = "equal"
    freeze_backbone: bool = True
    pooling: str = "cls"

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> ExitSpec | None:
        """The spec of an `early_exit` section, None without exit layers.

        Args:
          cfg: the section (as in `jaxcompress.config.finetune_defaults().early_exit`).

        Returns:
          An `ExitSpec`, or None.

        Raises:
          ValueError: an unknown target, weighting or pooling.
        """
        if not cfg.layers:
            return None
        if cfg.targets not in TARGETS or cfg.weighting not in WEIGHTINGS:
            raise ValueError(
                f"early_exit.targets in {TARGETS}, weighting in {WEIGHTINGS}: {cfg.targets!r}, "
                f"{cfg.weighting!r}"
            )
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"early_exit.pooling must be one of {POOLINGS}, got {cfg.pooling!r}")
        layers = tuple(int(n) for n in cfg.layers)
        return cls(layers, cfg.targets, cfg.weighting, bool(cfg.freeze_backbone), cfg.pooling)


def make_exit_loss(model: Bert, spec: ExitSpec, teacher: Bert | None = None) -> LossFn:
    """The training loss of an `early_exit` section (see the module docstring); aux holds
    each exit's loss."""
    layers = check_layers(model.config, spec.layers)
    if (spec.targets == "teacher") != (teacher is not None):
        raise ValueError("early_exit.targets='teacher' needs distill.teacher, and only it uses one")
    head = ExitHead(model.config, spec.pooling)
    last = model.config.num_hidden_layers

    def loss_fn(params, batch: Batch, rng, teacher_params=None):
        backbone, exits = split_exits(params)
        if spec.freeze_backbone:
            backbone = jax.lax.stop_gradient(backbone)
            rng = None  # a frozen backbone is run as at inference: its features do not change
        out = forward(model, backbone, batch, rng, output_hidden_states=True)
        labels, mask, tokens = batch["labels"], batch["example_mask"], batch["attention_mask"]
        if spec.targets == "final":
            target = jax.lax.stop_gradient(out.logits)
        elif spec.targets == "teacher":
            target = jax.lax.stop_gradient(forward(teacher, teacher_params, batch, None).logits)

        def exit_loss(logits):
            return (
                task_loss(logits, labels, mask)
                if spec.targets == "labels"
                else distill.soft_cross_entropy(logits, target, mask)
            )

        terms = {
            n: exit_loss(head.apply({"params": exits[str(n)]}, out.hidden_states[n], tokens))
            for n in layers
        }
        if not spec.freeze_backbone:
            terms[last] = task_loss(out.logits, labels, mask)
        weights = {n: float(n) if spec.weighting == "layer" else 1.0 for n in terms}
        total = sum(weights[n] * v for n, v in terms.items()) / sum(weights.values())
        return total, {f"exit{n}_loss": v for n, v in terms.items()}

    return loss_fn


def frozen_backbone_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` whose updates outside the exit heads are zero (so weight decay does not move a
    frozen backbone either)."""

    def only_exits(updates, params=None):
        del params
        return {k: v if k == EXITS else jax.tree.map(jnp.zeros_like, v) for k, v in updates.items()}

    return optax.chain(tx, optax.stateless(only_exits))


@dataclasses.dataclass(frozen=True)
class Policy:
    """When an example leaves: `kind` in POLICIES, `value` the entropy threshold (nats), the
    number k of agreeing exits, or the layer budget."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"policy kind must be one of {POLICIES}, got {self.kind!r}")
        if self.kind in ("patience", "budget") and (
            self.value < 1 or self.value != int(self.value)
        ):
            raise ValueError(f"{self.kind} needs a whole number >= 1, got {self.value}")


def entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats) of softmax(logits) per row."""
    z = logits - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(-1)


@dataclasses.dataclass
class PolicyState:
    """Per example: the previous exit's prediction and how many exits in a row agree."""

    previous: np.ndarray
    agreeing: np.ndarray

    @classmethod
    def start(cls, rows: int) -> PolicyState:
        return cls(np.full(rows, -1), np.zeros(rows, np.int64))

    def take(self, keep: np.ndarray) -> PolicyState:
        return PolicyState(self.previous[keep], self.agreeing[keep])


def decide(policy: Policy, logits: np.ndarray, layer: int, state: PolicyState) -> np.ndarray:
    """Which rows exit after `layer` given their exit's logits; updates `state` in place."""
    prediction = logits.argmax(-1)
    same = prediction == state.previous
    state.agreeing = np.where(same, state.agreeing + 1, 1)
    state.previous = prediction
    if policy.kind == "entropy":
        return entropy(logits) < policy.value
    if policy.kind == "patience":
        return state.agreeing >= policy.value
    return np.full(len(logits), layer >= policy.value)


class _At(nn.Module):
    """Runs `make(name)`'s `method` at the module path `names`, so a piece of the model
    finds its parameters (and low-rank settings) where the whole model keeps them."""

    names: tuple[str, ...]
    make: Callable[[str], nn.Module]
    method: str = "__call__"

    @nn.compact
    def __call__(self, *args):
        if len(self.names) == 1:
            return getattr(self.make(self.names[0]), self.method)(*args)
        return _At(self.names[1:], self.make, self.method, name=self.names[0])(*args)


def _bucket(rows: int, cap: int) -> int:
    return min(cap, 1 << max(rows - 1, 0).bit_length())


class ExitRunner:
    """Layer-by-layer inference with exits; `run` returns each example's logits and the number
    of layers it ran. Works on any `BertConfig` the model runs (pruned heads and neurons,
    shared or low-rank layers), without token elimination."""

    def __init__(self, config: BertConfig, params: dict, exits: dict, pooling: str = "cls"):
        self.config = config
        self.params, self.exits = split_exits(params)[0], exits
        self.layers = check_layers(config, [int(n) for n in exits])
        cfg = config
        embed = _At(("bert", "embeddings"), lambda n: Embeddings(cfg, name=n))
        self._embed = jax.jit(lambda p, ids, types: embed.apply({"params": p}, ids, types, True))

        def layer_fn(layer: int):
            a, f = cfg.attention_group(layer), cfg.ffn_group(layer)
            ha, wa = cfg.layer_heads(layer), cfg.layer_intermediate(layer)

            def make(n):
                return Layer(cfg, ha, wa, True, name=n)

            attend = _At(("bert", "encoder", "layer", str(a)), make, "attend")
            feed = _At(("bert", "encoder", "layer", str(f)), make, "feed_forward")

            def run(p, x, bias):
                y, _ = attend.apply({"params": p}, x, bias)
                return feed.apply({"params": p}, y)

            return jax.jit(run)

        self._layers = [layer_fn(i) for i in range(cfg.num_hidden_layers)]

        def head_fn(pooling: str):
            head = ExitHead(cfg, pooling)
            return jax.jit(
                lambda p, x, bias: head.apply({"params": p}, x, token_drop.mask_from_bias(bias))
            )

        self._exit_head, self._final_head = head_fn(pooling), head_fn("cls")
        self._final = model_head(self.params)

    def head(self, layer: int, x: jax.Array, bias: jax.Array) -> jax.Array:
        """The logits of the exit after `layer` (the model's own head after the last)."""
        if layer == self.config.num_hidden_layers:
            return self._final_head(self._final, x, bias)
        return self._exit_head(self.exits[str(layer)], x, bias)

    def run(self, batch: Batch, policy: Policy) -> tuple[np.ndarray, np.ndarray]:
        """Logits (rows, classes) and layers run per row of `batch` (padding rows, with
        example_mask 0, run no layer and get zero logits)."""
        ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
        rows, last = len(ids), self.config.num_hidden_layers
        logits = np.zeros((rows, self.config.num_labels), np.float32)
        layers_run = np.zeros(rows, np.int64)
        active = np.flatnonzero(np.asarray(batch["example_mask"]) > 0)
        if not len(active):
            return logits, layers_run
        x = self._embed(self.params, ids, np.asarray(batch["token_type_ids"]))
        bias = token_drop.bias_from_mask(jnp.asarray(mask) > 0)
        # Row j of x (and bias) holds example active[j]; rows past len(active) are filler.
        x, bias = _regroup(x, bias, active, rows)
        state = PolicyState.start(len(active))
        for i in range(last):
            x = self._layers[i](self.params, x, bias)
            n = i + 1
            if n not in self.layers and n != last:
                continue
            out = np.asarray(self.head(n, x, bias))[: len(active)]
            leaving = decide(policy, out, n, state) | (n == last)
            logits[active[leaving]] = out[leaving]
            layers_run[active[leaving]] = n
            if leaving.all():
                break
            if leaving.any():
                stay = ~leaving
                active, state = active[stay], state.take(stay)
                x, bias = _regroup(x, bias, np.flatnonzero(stay), rows)
        return logits, layers_run


def _regroup(x: jax.Array, bias: jax.Array, rows: np.ndarray, cap: int):
    """Rows `rows` of x and bias, padded (repeating the last) to a power of two <= cap."""
    size = _bucket(len(rows), cap)
    if size == x.shape[0] and np.array_equal(rows, np.arange(size)):
        return x, bias
    index = jnp.asarray(np.concatenate([rows, np.full(size - len(rows), rows[-1])]))
    return jnp.take(x, index, axis=0), jnp.take(bias, index, axis=0)


def exit_accuracies(
    config: BertConfig, params: dict, batches: Sequence[Batch], pooling: str = "cls"
) -> dict[int, float]:
    """Accuracy of every exit (and the model's own head) on labelled batches."""
    model, exits = split_exits(params)
    layers = check_layers(config, [int(n) for n in exits])
    head = ExitHead(config, pooling)

    @jax.jit
    def predictions(p, e, batch):
        out = forward(Bert(config), p, batch, None, output_hidden_states=True)
        tokens = batch["attention_mask"]
        each = {
            n: head.apply({"params": e[str(n)]}, out.hidden_states[n], tokens).argmax(-1)
            for n in layers
        }
        each[config.num_hidden_layers] = out.logits.argmax(-1)
        return each

    right: dict[int, float] = {}
    count = 0.0
    for batch in batches:
        real = np.asarray(batch["example_mask"]) > 0
        got = predictions(model, exits, {k: v for k, v in batch.items() if k != "index"})
        for n, pred in got.items():
            right[n] = right.get(n, 0.0) + float((np.asarray(pred) == batch["labels"])[real].sum())
        count += real.sum()
    return {n: right[n] / count for n in sorted(right)}


def save_exit_model(
    path: str | os.PathLike,
    config: BertConfig,
    params: dict,
    pooling: str,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """A native artefact of the model with its exit heads (`params[EXITS]`), and
    `early_exit.json` (layers, pooling) beside it."""
    target = artefact.save(config, params, path, tokenizer_dir)
    layers = sorted(int(n) for n in params[EXITS])
    (target / EXITS_FILE).write_text(json.dumps({"layers": layers, "pooling": pooling}) + "\n")
    return target


def load_exit_model(path: str | os.PathLike) -> tuple[BertConfig, dict, dict, str]:
    """`(config, model params, exit heads, pooling)` of `save_exit_model`'s directory."""
    meta_file = Path(path) / EXITS_FILE
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} does not exist (not a model with exit heads)")
    config, params = artefact.load(path)
    model, exits = split_exits(params)
    return config, model, exits, json.loads(meta_file.read_text())["pooling"]
