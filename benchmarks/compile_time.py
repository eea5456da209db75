"""Compile seconds of the train and eval steps: per layer against a scan, one after another
against ahead of the run in parallel.

  python benchmarks/compile_time.py [--shapes minilm-l6-h384 bert-base] [--quick]

For each model shape (random weights, SST-2-sized head), the jitted train step (task loss,
AdamW) and the eval forward are lowered and compiled from scratch (no persistent cache) at
batch B x 128, once with `scan_layers=False` (every layer its own program) and once with
`scan_layers=True` (one layer compiled, run as an `nn.scan`), on this machine's default
device. Writes benchmarks/results/compile_time.json; rows are keyed by device, so rows of
other devices are kept.

Then, for each shape, the train step of every padded length the device's default buckets
(`config.device_buckets(128)`) give: compiled one after another, as a run without
`precompile` meets them, against `precompile.compile_programs` (lowered in turn, compiled in
parallel threads, as `precompile="on"` does before the first step).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from throughput import SHAPES, device_name
from timing import random_batch

from jaxcompress.compress.distill import objective as objectives
from jaxcompress.config import device_buckets, finetune_defaults
from jaxcompress.experiments.results import write_result
from jaxcompress.models.bert import Bert, init_params
from jaxcompress.train import precompile, sharding
from jaxcompress.train.step import TrainState, make_optimizer, make_train_step, new_rng

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks/results/compile_time.json"
SEQ_LEN = 128


def train_step_of(config):
    """A fresh jitted train step of `config` (nothing compiled yet) and its state."""
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    tx = make_optimizer(finetune_defaults().train, 1000)
    state = TrainState(jnp.array(0), params, tx.init(params), new_rng(0))
    return make_train_step(objectives.finetune_loss(Bert(config)), tx), state, params


def compile_seconds(config, batch_size: int) -> dict[str, float]:
    """Seconds to lower and compile the train step and the eval forward of `config`."""
    step, state, params = train_step_of(config)
    batch = random_batch(batch_size, SEQ_LEN, config.num_labels)
    t0 = time.perf_counter()
    step.lower(state, batch, None).compile()
    train = time.perf_counter() - t0

    def logits(p, b):
        return objectives.forward(Bert(config), p, b, None).logits

    t0 = time.perf_counter()
    jax.jit(logits).lower(params, batch).compile()
    return {"train_step_s": train, "eval_step_s": time.perf_counter() - t0}


def all_lengths_seconds(config, batch_size: int, lengths: tuple[int, ...]) -> dict[str, float]:
    """Seconds to compile the train step for every length: one after another, then (a fresh
    step) by `precompile.compile_programs`."""
    step, state, _ = train_step_of(config)
    t0 = time.perf_counter()
    for n in lengths:
        step.lower(state, random_batch(batch_size, n, config.num_labels), None).compile()
    one_by_one = time.perf_counter() - t0
    step, state, _ = train_step_of(config)
    mesh = sharding.mesh_from_config(finetune_defaults().mesh)
    t0 = time.perf_counter()
    jobs = {
        n: (step.lower, (state, random_batch(batch_size, n, config.num_labels), None))
        for n in lengths
    }
    precompile.compile_programs(mesh, jobs)
    return {"one_by_one_s": one_by_one, "ahead_parallel_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--quick", action="store_true", help="batch 2, MiniLM only (a check)")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    jax.config.update("jax_compilation_cache_dir", None)  # every compilation from scratch
    shapes = ["minilm-l6-h384"] if args.quick else args.shapes
    platform = jax.default_backend()
    batch_size = 2 if args.quick else (8 if platform == "cpu" else 128)
    device = device_name(jax.devices()[0])
    rows = []
    for shape in shapes:
        base = SHAPES[shape]
        for scan in (False, True):
            seconds = compile_seconds(base.replace(scan_layers=scan), batch_size)
            name = f"{shape} {'scanned' if scan else 'per-layer'}"
            row = {"name": name, "device": device, "platform": platform, "shape": shape}
            row |= {"scan_layers": scan, "metric": "train_step_compile_s"}
            sizes = {"layers": base.num_hidden_layers, "batch_size": batch_size, "seq_len": SEQ_LEN}
            rows.append({**row, **sizes, **seconds, "value": seconds["train_step_s"]})
            print(json.dumps(rows[-1]))
        lengths = device_buckets(SEQ_LEN)
        seconds = all_lengths_seconds(base, batch_size, lengths)
        row = {"name": f"{shape} all lengths", "device": device, "platform": platform}
        row |= {"shape": shape, "metric": "precompile_speedup", "lengths": list(lengths)}
        row |= {"batch_size": batch_size, "threads": min(len(lengths), os.cpu_count() or 1)}
        speedup = seconds["one_by_one_s"] / seconds["ahead_parallel_s"]
        rows.append({**row, **seconds, "value": speedup})
        print(json.dumps(rows[-1]))
    out = Path(args.out)
    if out.exists():  # keep rows of other devices and shapes
        measured = {(r["device"], r["name"]) for r in rows}
        old = json.loads(out.read_text())["rows"]
        rows += [r for r in old if (r["device"], r["name"]) not in measured]
    write_result(out, "compile_time", {"rows": rows})


if __name__ == "__main__":
    main()
