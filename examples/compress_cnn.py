"""Compress a linen CNN that jaxcompress never saw: low-rank dense layers, then 50% magnitude
pruning and 4-bit QAT through the optax wrapper; prints accuracy, bytes and FLOPs before and
after.

    python examples/compress_cnn.py [--steps 300] [--seed 0]

The data are synthetic: 16 x 16 grey images of four classes, each a fixed random pattern
shifted by up to two pixels under strong noise.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
from safetensors.numpy import save_file

import jaxcompress as jc

CLASSES, SIZE, BATCH = 4, 16, 64
KERNELS = r".*/(kernel|kernel_a|kernel_b)"  # conv kernels, dense kernels and their factors


class CNN(nn.Module):
    """Two 3 x 3 convolutions and two dense layers."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(CLASSES)(x)


def make_data(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` noisy, shifted images of the four class patterns and their labels."""
    patterns = np.random.default_rng(1234).normal(size=(CLASSES, SIZE, SIZE))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    shifts = rng.integers(-2, 3, (count, 2))
    images = np.stack(
        [np.roll(patterns[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts, strict=True)]
    )
    images = images + rng.normal(scale=1.5, size=images.shape)
    return images[..., None].astype(np.float32), labels.astype(np.int32)


def loss_fn(params, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = CNN().apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x: np.ndarray, y: np.ndarray, low_rank: bool = False) -> float:
    def predict(p):
        if low_rank:
            with jc.low_rank_layers():
                return CNN().apply({"params": p}, x).argmax(-1)
        return CNN().apply({"params": p}, x).argmax(-1)

    return float((jax.jit(predict)(params) == y).mean())


def flops(params, x: np.ndarray, low_rank: bool = False) -> float:
    """FLOPs of one forward pass over `x`, from XLA's cost analysis of the compiled program."""

    def forward(p):
        if low_rank:
            with jc.low_rank_layers():
                return CNN().apply({"params": p}, x)
        return CNN().apply({"params": p}, x)

    cost = jax.jit(forward).lower(params).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def file_bytes(write) -> int:
    """Bytes of the file `write(path)` writes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        write(path)
        return path.stat().st_size


def float_bytes(params) -> int:
    flat = {jc.leaf_paths(params)[i]: np.asarray(v) for i, v in enumerate(jax.tree.leaves(params))}
    return file_bytes(lambda path: save_file(flat, str(path)))


def train_float(params, data, steps: int, seed: int):
    """Plain Adam training of the float model."""
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for x, y in batches(data, steps, seed):
        params, opt_state = step(params, opt_state, x, y)
    return params


def train_compressed(params, data, steps: int, seed: int):
    """Fine-tune the low-rank model with pruning and QAT kept in the optimizer state; returns
    the exported params (pruned weights zero, quantized weights on their 4-bit grid)."""
    prune = jc.magnitude_pruning(
        [(KERNELS, True), (".*", None)], jc.Schedule(0.5, end_step=steps // 2, frequency=10)
    )
    quantize = jc.weight_quantization(jc.kernel_rules(jc.QuantSpec(bits=4)))
    tx = jc.with_reparam(jc.chain(prune, quantize), optax.adam(3e-4))

    def compressed_loss(params, opt_state, x, y):
        with jc.low_rank_layers():  # the model runs each factorized layer as two matmuls
            return loss_fn(jc.reparam_apply(params, opt_state), x, y)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(compressed_loss)(params, opt_state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for x, y in batches(data, steps, seed + 1):
        params, opt_state = step(params, opt_state, x, y)
    return jc.finalize(params, opt_state)


def batches(data, steps: int, seed: int):
    images, labels = data
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.integers(0, len(labels), BATCH)
        yield images[rows], labels[rows]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each training phase")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_data, (test_x, test_y) = make_data(args.seed, 4096), make_data(args.seed + 100, 1024)
    params = CNN().init(jax.random.key(args.seed), test_x[:1])["params"]
    params = train_float(params, train_data, args.steps, args.seed)

    factored, ranks = jc.low_rank_params(params, [(r"Dense_0/kernel", jc.LowRank(rank=16))])
    compressed = train_compressed(factored, train_data, args.steps, args.seed)

    kernels = [
        v
        for p, v in zip(jc.leaf_paths(compressed), jax.tree.leaves(compressed), strict=True)
        if p.endswith(("kernel", "kernel_a", "kernel_b"))
    ]
    rules = jc.kernel_rules(jc.QuantSpec(bits=4))
    result = {
        "accuracy": (accuracy(params, test_x, test_y), accuracy(compressed, test_x, test_y, True)),
        "bytes": (float_bytes(params), file_bytes(lambda p: jc.save_packed(p, compressed, rules))),
        "flops": (flops(params, test_x[:1]), flops(compressed, test_x[:1], low_rank=True)),
        "kernel_sparsity": float(
            sum(int((np.asarray(k) == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
        ),
        "ranks": ranks,
    }
    print(f"low-rank factors: {ranks}; kernel sparsity {result['kernel_sparsity']:.3f}")
    print(f"{'':>10} {'float':>12} {'compressed':>12}")
    for name, (before, after) in [(k, result[k]) for k in ("accuracy", "bytes", "flops")]:
        print(f"{name:>10} {before:>12.4g} {after:>12.4g}")
    return result


if __name__ == "__main__":
    main()
