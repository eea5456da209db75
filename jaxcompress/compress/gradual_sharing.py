"""Gradual cross-layer sharing as a training-time method: layers blend into their group's mean."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict
from safetensors.numpy import load_file, save_file

from jaxcompress import core
from jaxcompress.compress import share
from jaxcompress.compress.method import Plan, Setup, TrainingMethod

MAP_KEY = "jaxcompress.shared"  # safetensors metadata: tied-away leaf path -> shared leaf path


@dataclasses.dataclass(frozen=True)
class ShareSpec:
    """A checked `share` section.

    Attributes:
      groups: 'all' (one group) or 'every:K' (K consecutive layers per group).
      params: regex of the per-layer leaves that are shared (the first all-digit component
        of a path is its layer index).
      begin: the fraction of training where the blend towards the group means starts.
      end: the fraction where every layer reads its group's mean (== begin: at once).
    """

    groups: str
    params: str
    begin: float = 0.0
    end: float = 0.0


class ShareState(NamedTuple):
    """How far each layer has moved into its group's mean: 0 (its own) to 1 (shared)."""

    blend: jax.Array


def _check_groups(groups: str) -> None:
    """Raises the section's error for groups of neither string form (no explicit lists)."""
    if isinstance(groups, str):
        with contextlib.suppress(ValueError):
            share.group_map(groups, 1)
            return
    raise ValueError(f"share.groups must be 'all' or 'every:K' with K >= 1, got {groups!r}")


def layer_groups(params: core.Params, rules: core.Rules, groups: str) -> list[list[str]]:
    """The leaf paths that become one shared leaf, each group in layer order.

    Args:
      params: any tree whose per-layer leaves have a layer index in their path
        ('bert/encoder/layer/3/attention/self/query/kernel'); extras ('kernel@...') are
        never shared.
      rules: `(regex, True or None)`: the leaves that are shared.
      groups: 'all' or 'every:K', applied to each stack of layers (paths that differ only in
        their layer index).

    Returns:
      Every group of two or more leaves, as lists of paths.

    Raises:
      ValueError: a selected leaf has no layer index, or groups is neither form.
    """
    selected = core.match_rules(params, rules, name="share")
    stacks: dict[tuple[str, str], dict[int, str]] = {}
    for path in selected:
        if "@" in path.rsplit("/", 1)[-1]:
            continue
        parts = path.split("/")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if at is None:
            raise ValueError(
                f"share.params selects {path!r}, which has no layer index; select only "
                "per-layer leaves (e.g. 'bert/encoder/layer/\\d+/.*')"
            )
        key = ("/".join(parts[:at]), "/".join(parts[at + 1 :]))
        stacks.setdefault(key, {})[int(parts[at])] = path
    found = []
    for layers in stacks.values():
        group_of = share.group_map(groups, max(layers) + 1)
        members: dict[int, list[str]] = {}
        for index in sorted(layers):
            members.setdefault(group_of[index], []).append(layers[index])
        found += [m for m in members.values() if len(m) > 1]
    return found


def gradual_sharing(rules: core.Rules, groups: str, begin_step: int, end_step: int) -> core.Reparam:
    """Each selected layer leaf blends linearly from its own value into its group's mean
    between `begin_step` and `end_step`: w' = (1 - b) w + b mean. From `end_step` on, every
    layer of a group reads the same values (the gradient of each stored copy is the mean of
    the layers' gradients) and `finalize` gives a tree that ties exactly (`share.tie`).

    Args:
      rules: `(regex, True or None)`: the per-layer leaves that are shared.
      groups: 'all' or 'every:K'.
      begin_step: the step where the blend starts (an int >= 0).
      end_step: the step where it reaches 1 (an int >= begin_step; equal: at once).

    Returns:
      A `core.Reparam` whose state is a `ShareState`.

    Raises:
      ValueError: the steps are out of order, or as `layer_groups`.
    """
    if not 0 <= begin_step <= end_step:
        raise ValueError(f"need 0 <= begin_step <= end_step, got {begin_step}, {end_step}")
    _check_groups(groups)  # its error now, not at the first apply

    def blend(step) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        if end_step == begin_step:
            return (step >= begin_step).astype(jnp.float32)
        return jnp.clip((step - begin_step) / (end_step - begin_step), 0.0, 1.0)

    def init(params):
        layer_groups(params, rules, groups)
        return ShareState(blend(0))

    def apply(params, state):
        flat = core.leaves_by_path(params)
        new = {}
        for members in layer_groups(params, rules, groups):
            shapes = {jnp.shape(flat[p]) for p in members}
            if len(shapes) > 1:
                raise ValueError(f"share: {members} differ in shape {sorted(shapes)}")
            mean = sum(flat[p] for p in members) / len(members)
            for p in members:
                new[p] = ((1.0 - state.blend) * flat[p] + state.blend * mean).astype(flat[p].dtype)
        return core.map_with_path(lambda p, x: new.get(p, x), params)

    def update(params, state, step):
        return ShareState(blend(step))

    return core.Reparam(init, apply, update)


def save_tied(path: str | os.PathLike, params: core.Params, members: list[list[str]]) -> Path:
    """Write `params` with each group stored once (its first member's values) to one
    safetensors file; its metadata maps every tied-away leaf to the leaf it reads.

    Args:
      path: the file to write (its folder is created).
      params: a tree whose grouped leaves are equal (a finished run's `finalize`).
      members: the groups, as `layer_groups` gives them.

    Returns:
      The path written.
    """
    tied, shared = share.tie(params, members, init="first")
    flat = {p: np.asarray(x) for p, x in core.leaves_by_path(tied).items() if x is not None}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata={MAP_KEY: json.dumps(shared)})
    return path


def load_tied(path: str | os.PathLike) -> dict:
    """The params of a file written by `save_tied`, every layer present.

    Args:
      path: a file written by `save_tied`.

    Returns:
      The params as nested dicts, each tied-away leaf a copy of the leaf it reads.

    Raises:
      ValueError: the file has no map of tied-away leaves (not written by `save_tied`).
    """
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        metadata = f.metadata() or {}
    if MAP_KEY not in metadata:
        raise ValueError(f"{path}: not a shared-layer artefact (no {MAP_KEY!r} metadata)")
    flat = load_file(str(path))
    for away, source in json.loads(metadata[MAP_KEY]).items():
        flat[away] = flat[source]
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def parse(cfg: Any) -> ShareSpec | None:
    """The spec of a config's `share` section, None when it shares nothing.

    Args:
      cfg: the section (attributes as in `jaxcompress.config.finetune_defaults().share`).

    Returns:
      A `ShareSpec`, or None.

    Raises:
      ValueError: groups of neither form, or a schedule out of order.
    """
    if not cfg.groups:
        return None
    _check_groups(cfg.groups)
    if not 0.0 <= cfg.begin <= cfg.end <= 1.0:
        raise ValueError(f"share: need 0 <= begin <= end <= 1, got {cfg.begin}, {cfg.end}")
    return ShareSpec(groups=cfg.groups, params=cfg.params, begin=cfg.begin, end=cfg.end)


def plan(spec: ShareSpec, params: core.Params, setup: Setup) -> Plan:
    """Sharing's part of a run: the blend on its schedule, the blend logged every step, and
    the tied artefact (`shared/params.safetensors`: each group stored once) as export."""
    rules = ((spec.params, True), (".*", None))
    begin, end = (round(f * setup.total_steps) for f in (spec.begin, spec.end))
    reparam = gradual_sharing(rules, spec.groups, begin, end)

    def export(params, state, directory: Path) -> dict[str, Any]:
        shared = reparam.apply(params, state)
        members = layer_groups(shared, rules, spec.groups)
        written = save_tied(directory / "shared" / "params.safetensors", shared, members)
        return {"bytes": written.stat().st_size, "shared_groups": len(members)}

    return Plan(
        reparam=reparam,
        metrics=lambda state: {"share_blend": state.blend},
        export=export,
    )


SHARING = TrainingMethod(section="share", parse=parse, plan=plan)
