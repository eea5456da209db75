"""Fine-tune a BERT on a GLUE task (the teacher of the compression benchmarks).

  jaxcompress finetune --config configs/finetune.py:sst2 --workdir runs/teacher_sst2
  jaxcompress finetune --config configs/finetune.py:sst2,quick --workdir runs/quick_sst2

`arg` is `TASK[,quick]`: quick trains 300 steps on a 9,600-example subset, then evaluates on
the full dev set.
"""

import ml_collections


def get_config(arg: str = "sst2") -> ml_collections.ConfigDict:
    task, *flags = (arg or "sst2").split(",")
    if unknown := set(flags) - {"quick"}:
        raise ValueError(f"unknown flags {sorted(unknown)}; known: quick")
    c = ml_collections.ConfigDict()
    c.model = "sentence-transformers/all-MiniLM-L6-v2"
    c.task = task
    c.seed = 0
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.epochs = 1.0
    c.train.lr = 1e-4
    if "quick" in flags:
        c.train.examples = 9600
        c.train.steps = 300
    return c
