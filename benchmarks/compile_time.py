"""Compile seconds of the train and eval steps, per-layer against one scan over the layers.

  python benchmarks/compile_time.py [--shapes minilm-l6-h384 bert-base] [--quick]

For each model shape (random weights, SST-2-sized head), the jitted train step (task loss,
AdamW) and the eval forward are lowered and compiled from scratch (no persistent cache) at
batch B x 128, once with `scan_layers=False` (every layer its own program) and once with
`scan_layers=True` (one layer compiled, run as an `nn.scan`), on this machine's default
device. Writes benchmarks/results/compile_time.json; rows are keyed by device, so rows of
other devices are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from throughput import SHAPES, device_name
from timing import random_batch

from jaxcompress.compress.distill import objective as objectives
from jaxcompress.config import finetune_defaults
from jaxcompress.experiments.results import write_result
from jaxcompress.models.bert import Bert, init_params
from jaxcompress.train.step import TrainState, make_optimizer, make_train_step, new_rng

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks/results/compile_time.json"
SEQ_LEN = 128


def compile_seconds(config, batch_size: int) -> dict[str, float]:
    """Seconds to lower and compile the train step and the eval forward of `config`."""
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    tx = make_optimizer(finetune_defaults().train, 1000)
    state = TrainState(jnp.array(0), params, tx.init(params), new_rng(0))
    batch = random_batch(batch_size, SEQ_LEN, config.num_labels)
    step = make_train_step(objectives.finetune_loss(Bert(config)), tx)
    t0 = time.perf_counter()
    step.lower(state, batch, None).compile()
    train = time.perf_counter() - t0

    def logits(p, b):
        return objectives.forward(Bert(config), p, b, None).logits

    t0 = time.perf_counter()
    jax.jit(logits).lower(params, batch).compile()
    return {"train_step_s": train, "eval_step_s": time.perf_counter() - t0}


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
    out = Path(args.out)
    if out.exists():  # keep rows of other devices and shapes
        measured = {(r["device"], r["shape"], r["scan_layers"]) for r in rows}
        old = json.loads(out.read_text())["rows"]
        rows += [r for r in old if (r["device"], r["shape"], r["scan_layers"]) not in measured]
    write_result(out, "compile_time", {"rows": rows})


if __name__ == "__main__":
    main()
