"""Fine-tune a BERT on a GLUE task (the teacher of the compression benchmarks).

  jaxcompress finetune --config configs/finetune.py:sst2 --workdir runs/teacher_sst2
  jaxcompress finetune --config configs/finetune.py:rte --workdir runs/teacher_rte
  jaxcompress finetune --config configs/finetune.py:sst2,quick --workdir runs/quick_sst2

`arg` is `TASK[,quick]`: quick trains 300 steps on a 9,600-example subset, then evaluates on
the full dev set. The recipe per task is `RECIPES`: batch 32, lr 1e-4, 6% warmup and linear
decay; one epoch of SST-2 (67k sentences), three of the small tasks.
"""

import ml_collections

# task: (epochs, lr)
RECIPES = {
    "sst2": (1.0, 1e-4),
    "cola": (3.0, 1e-4),
    "mrpc": (3.0, 1e-4),
    "stsb": (3.0, 1e-4),
    "rte": (3.0, 1e-4),
}


def get_config(arg: str = "sst2") -> ml_collections.ConfigDict:
    task, *flags = (arg or "sst2").split(",")
    if unknown := set(flags) - {"quick"}:
        raise ValueError(f"unknown flags {sorted(unknown)}; known: quick")
    epochs, lr = RECIPES.get(task, (3.0, 1e-4))
    c = ml_collections.ConfigDict()
    c.model = "sentence-transformers/all-MiniLM-L6-v2"
    c.task = task
    c.seed = 0
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.epochs = epochs
    c.train.lr = lr
    if "quick" in flags:
        c.train.examples = 9600
        c.train.steps = 300
    return c
