"""Device meshes and named shardings for parameters, compression state, teachers and batches.

A mesh has three axes: `data` (replicas), `fsdp` (parameters split, batches split) and
`tensor` (Megatron-style: attention projections, FFN neurons and the vocabulary split). Every
BERT parameter carries logical axis names (`models/bert.py`); `RULES` map them to mesh axes.
A dimension that a mesh axis does not divide stays whole, so pruned or odd shapes still run.

Leaves a compression transform keeps beside a weight (`name@suffix`: movement scores, LSQ
steps, binary-split halves) take the weight's sharding on the trailing dimensions they share
with it; reduced dimensions (a per-channel scale has no input axis) are not split. Optimizer
moments and pruning masks take the sharding of the parameter they belong to; a teacher is
sharded by the same rules as the student.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcompress import core
from jaxcompress.models import bert

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical axis -> mesh axis (or None: never split). Activations: only the batch is split.
RULES: tuple[tuple[str, Any], ...] = (
    (bert.BATCH, BATCH_AXES),
    (bert.LENGTH, None),
    (bert.ACTIVATION_EMBED, None),
    (bert.VOCAB, "tensor"),
    (bert.EMBED, "fsdp"),
    (bert.QKV, "tensor"),
    (bert.MLP, "tensor"),
    (bert.HIDDEN, "tensor"),
    (bert.RANK, None),
    (bert.CLASSES, None),
    (bert.POSITIONS, None),
    (bert.TYPES, None),
)
# FSDP's startup check: parameters at least this large must be split when fsdp > 1.
LARGE_PARAM = 2**16


def mesh_shape(sizes: Sequence[int], device_count: int) -> tuple[int, ...]:
    """Axis sizes with one -1 filled by the devices the others leave; the product must be
    the device count."""
    if any(s == 0 or s < -1 for s in sizes) or list(sizes).count(-1) > 1:
        raise ValueError(f"mesh sizes must be positive, with at most one -1: {tuple(sizes)}")
    known = math.prod(s for s in sizes if s != -1)
    filled = tuple(device_count // known if s == -1 else s for s in sizes)
    if math.prod(filled) != device_count:
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} does not fit {device_count} devices "
            f"(product {math.prod(filled)})"
        )
    return filled


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all of them by default), laid out by
    `mesh_utils` so the tensor axis gets the closest devices."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape((data, fsdp, tensor), len(devices))
    return Mesh(mesh_utils.create_device_mesh(shape, devices=devices), AXES)


def mesh_from_config(cfg: Any) -> Mesh:
    """The mesh of a config's `mesh` section."""
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor)


def _axis_size(mesh: Mesh, axis: Any) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with the mesh axes that do not divide their dimension (or have size 1) dropped."""
    axes = list(spec) + [None] * (len(shape) - len(spec))
    return PartitionSpec(
        *(
            None if a is None or _axis_size(mesh, a) == 1 or dim % _axis_size(mesh, a) else a
            for a, dim in zip(axes, shape, strict=False)
        )
    )


def inherit_spec(
    spec: PartitionSpec, weight_shape: Sequence[int], leaf_shape: Sequence[int]
) -> PartitionSpec:
    """The spec of a leaf kept beside a weight: the weight's axes on trailing dimensions of
    equal size, nothing on the others (a reduced or grouped dimension is not split)."""
    axes = list(spec) + [None] * (len(weight_shape) - len(spec))
    out = [None] * len(leaf_shape)
    for i in range(1, min(len(leaf_shape), len(weight_shape)) + 1):
        if leaf_shape[-i] == weight_shape[-i]:
            out[-i] = axes[-i]
    return PartitionSpec(*out)


def _logical_specs(config: bert.BertConfig, rules) -> dict[str, PartitionSpec]:
    logical = flatten_dict(bert.param_logical_axes(config), sep="/")
    return {path: nn.logical_to_mesh_axes(spec, rules) for path, spec in logical.items()}


def param_specs(config: bert.BertConfig, params: Any, mesh: Mesh, rules: Sequence = RULES) -> Any:
    """A `PartitionSpec` for every leaf of a trainable tree: model parameters by their
    logical axes, `name@suffix` leaves like their weight, anything else (distillation
    projections) replicated."""
    by_path = _logical_specs(config, rules)
    flat = flatten_dict(params, sep="/")
    out = {}
    for path, leaf in flat.items():
        base = path.split("@")[0]
        spec = PartitionSpec()
        if base in by_path and base in flat:
            spec = by_path[base]
            if base != path:
                spec = inherit_spec(spec, np.shape(flat[base]), np.shape(leaf))
        out[path] = fit_spec(spec, np.shape(leaf), mesh)
    return unflatten_dict(out, sep="/")


def place_params(config: bert.BertConfig, params: Any, mesh: Mesh) -> tuple[Any, Any]:
    """`params` put on `mesh` by the rules, and their specs."""
    specs = param_specs(config, params, mesh)
    return jax.device_put(params, named(mesh, specs)), specs


def init_sharded(config: bert.BertConfig, rng: jax.Array, mesh: Mesh) -> Any:
    """Fresh parameters created directly in their shardings: shapes from `jax.eval_shape`,
    specs from the rules, then a jitted init whose outputs land split over the mesh (no
    device ever holds a whole large parameter)."""
    specs = param_specs(config, bert.abstract_params(config), mesh)
    init = jax.jit(functools.partial(bert.init_params, config), out_shardings=named(mesh, specs))
    return init(rng)


def state_specs(tree: Any, params: Any, specs: Any) -> Any:
    """Specs for a tree holding copies of the parameters (optimizer moments, pruning masks,
    any reparam's state): a leaf whose key path ends with a parameter's path and whose shape
    is that parameter's gets its spec; every other leaf (counters, schedules, the scalar mask
    of an unpruned weight) is replicated."""
    by_path = {
        core.path_str(path): (np.shape(p), s)
        for (path, p), s in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
            strict=True,
        )
    }

    def spec_of(path, leaf) -> PartitionSpec:
        keys = [core.key_str(k) for k in path]
        for start in range(len(keys)):
            found = by_path.get("/".join(keys[start:]))
            if found is not None and found[0] == np.shape(leaf):
                return found[1]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def named(mesh: Mesh, specs: Any) -> Any:
    """`NamedSharding`s on `mesh` for a tree of `PartitionSpec`s."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_fsdp(params: Any, mesh: Mesh, min_size: int = LARGE_PARAM) -> None:
    """Fails when FSDP is asked for (fsdp > 1) and a parameter of `min_size` or more
    elements is still whole on every device."""
    if mesh.shape["fsdp"] == 1:
        return
    whole = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if x.size >= min_size and x.sharding.is_fully_replicated
    ]
    if whole:
        raise ValueError(f"fsdp={mesh.shape['fsdp']} but these parameters are not split: {whole}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch size") -> None:
    ways = _axis_size(mesh, BATCH_AXES)
    if batch_size % ways:
        raise ValueError(
            f"{name} {batch_size} does not split over the mesh's data x fsdp = {ways} devices"
        )


def local_batch_to_global(batch: dict, mesh: Mesh) -> dict:
    """A global batch from this process's rows (each host reads only its share)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def full_batch_to_global(batch: dict, mesh: Mesh) -> dict:
    """A global batch, split over the data axes, from the whole batch every process holds."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        for k, v in batch.items()
    }


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly multi-host) global arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def within(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` run with `mesh` and `RULES` in force, so the model's activation constraints
    (traced on the first call) split the batch over the mesh."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
            return fn(*args, **kwargs)

    return wrapped


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` once (it detects TPU pods, SLURM and Open MPI)."""
    if not jax.distributed.is_initialized():
        jax.distributed.initialize()
