"""Run in a subprocess (`python -m tests.sharded_training MODEL TEACHER GLUE WORKDIR MODE`)
with XLA's host device count set: trains tiny runs under several meshes, prints their losses.

MODE "reference" (1 device): each case once. MODE "meshes" (8 devices): QAT, pruning and
distillation at once under a 2 x 2 x 2 mesh; a fine-tuning run started under an 8-way FSDP
mesh, stopped after 2 steps and resumed under a 2 x 4 data x tensor mesh; and fresh
parameters initialised directly split over an FSDP mesh.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from jaxcompress.models.bert import init_params
from jaxcompress.train import sharding
from jaxcompress.train.loop import train
from tests.helpers import tiny_config, tiny_run_config

CASES = {
    "finetune": {},
    # QAT, pruning and layer distillation in one run: each compiled run costs seconds
    "methods": {
        "quantize.kernels": "bits=4",
        "quantize.activation_bits": 8,
        "prune.method": "magnitude",
        "prune.sparsity": 0.5,
        "prune.end": 0.5,
        "distill.hidden": 1.0,
    },
}
STEPS = 3
MESHES = {"fsdp": (1, 8, 1), "tensor": (2, 1, 4), "mixed": (2, 2, 2)}


def run(model_dir, teacher_dir, glue_dir, workdir, case, mesh, stop_after_step=None):
    config = tiny_run_config(model_dir, glue_dir, steps=STEPS)
    with config.unlocked():
        config.log_every = 1
        config.checkpoint_every = STEPS  # the end (and the stop of a stopped run)
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
        # split runs compile their train and eval programs ahead: the same numbers as the
        # one-device reference, which compiles each when it is first called
        config.precompile = "off" if mesh == (1, 1, 1) else "on"
        config.distill.teacher = str(teacher_dir) if case == "methods" else ""
        for key, value in CASES[case].items():
            section, name = key.split(".")
            config[section][name] = value
    summary = train(config, workdir, stop_after_step=stop_after_step)
    if stop_after_step is not None:
        return None
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    return {"losses": losses, "value": summary["value"]}


def main(model_dir, teacher_dir, glue_dir, workdir, mode):
    workdir = Path(workdir)
    report = {"devices": jax.device_count()}
    if mode == "reference":
        for case in CASES:
            report[case] = run(model_dir, teacher_dir, glue_dir, workdir / case, case, (1, 1, 1))
    else:
        report["methods/mixed"] = run(
            model_dir, teacher_dir, glue_dir, workdir / "methods", "methods", MESHES["mixed"]
        )
        config = tiny_config(num_labels=2)
        mesh = sharding.make_mesh(1, 8, 1)
        fresh = sharding.init_sharded(config, jax.random.key(0), mesh)
        sharding.check_fsdp(fresh, mesh)  # raises if a large parameter is whole
        expected = init_params(config, jax.random.key(0))
        differences = jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a) - b).max()), fresh, expected
        )
        split = [not x.sharding.is_fully_replicated for x in jax.tree.leaves(fresh)]
        report["init_sharded"] = {
            "max_abs_diff": max(jax.tree.leaves(differences)),
            "split": sum(split),
            "leaves": len(split),
        }
        resumed = workdir / "resumed"
        run(model_dir, teacher_dir, glue_dir, resumed, "finetune", MESHES["fsdp"], 2)
        report["finetune/fsdp-then-tensor"] = run(
            model_dir, teacher_dir, glue_dir, resumed, "finetune", MESHES["tensor"]
        )
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
