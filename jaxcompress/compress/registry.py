"""Every compression method by name: structure transforms and training-time methods."""

from __future__ import annotations

from jaxcompress.compress import transforms
from jaxcompress.compress.gradual_sharing import SHARING
from jaxcompress.compress.method import TrainingMethod
from jaxcompress.compress.prune.method import PRUNING
from jaxcompress.compress.quant.method import QUANTIZATION

# name -> factory of a structure transform `(config, params) -> (config, params)`, as a config's
# `transforms` list names them ("low_rank(target='ffn', fraction=0.5)").
TRANSFORMS = transforms.REGISTRY

# The training-time methods a train loop runs, each from its config section. Their reparams
# are chained in this order (layers blend into their shared values, pruning masks the weights
# that quantization then sees).
TRAINING_METHODS: tuple[TrainingMethod, ...] = (SHARING, PRUNING, QUANTIZATION)
# Key suffixes of trainable extras that are not weights (no weight decay), from every method.
NOT_WEIGHTS: tuple[str, ...] = tuple(s for m in TRAINING_METHODS for s in m.not_weights)
