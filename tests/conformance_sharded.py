"""Run in a subprocess with 8 simulated CPU devices: transforms on sharded parameters."""

import functools
import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.conformance_cases import CASES, logits, model_and_batch


def shard(params, mesh):
    """Put each parameter on the mesh, split over its first dimension divisible by 8."""

    def place(x):
        axes = [None] * x.ndim
        for dim, size in enumerate(x.shape):
            if size % 8 == 0:
                axes[dim] = "x"
                break
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*axes)))

    return jax.tree_util.tree_map(place, params)


def main():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    report = {}
    for case in CASES:
        config, params, batch = model_and_batch()
        reference_config, reference_params = case.strong(config, params)
        expected = np.asarray(logits(reference_config, reference_params, batch))
        sharded = shard(params, mesh)
        new_config, new_params = case.strong(config, sharded)
        new_params = shard(new_params, mesh)
        got = jax.jit(functools.partial(logits, new_config))(new_params, batch)
        n_sharded = sum(
            not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(new_params)
        )
        report[case.name] = {
            "devices": len(jax.devices()),
            "sharded_params": n_sharded,
            "max_abs_diff": float(np.abs(np.asarray(got) - expected).max()),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
