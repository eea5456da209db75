"""Dynamic inference on SST-2 from the fine-tuned teacher: early-exit heads and PoWER-BERT.

  jaxcompress finetune --config configs/dynamic.py:exits_labels --workdir runs/dynamic/exits_labels

`arg` is `NAME[,quick][,teacher=PATH]`:
- exits_labels: DeeBERT's second stage: exit heads after layers 1-5, trained on the labels
  with the backbone (and its own head) frozen;
- exits_final: the same heads trained by FastBERT's self-distillation from the model's own
  last-layer prediction;
- exits_labels_mean, exits_final_mean: the same, with heads reading the mean of the layer's
  token vectors instead of [CLS] (the base model is a sentence-transformers model trained
  for mean pooling: its early [CLS] vectors say little about the sentence);
- power_mild, power_strong: PoWER-BERT word-vector elimination with a given retention per
  layer, the model fine-tuned under it by logit distillation from the unpruned teacher.
Every run trains 400 steps of batch 32 on the fixed 12,800-example subset the other SST-2
benchmarks use; `quick` trains 2 steps on 64 examples (what the tests run).
"""

import ml_collections

TEACHER = "minilm-l6-sst2-teacher"
EXIT_RUNS = ("exits_labels", "exits_final", "exits_labels_mean", "exits_final_mean")
RETENTION = {  # fraction of the padded length each layer keeps (PoWER-BERT)
    "power_mild": (0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
    "power_strong": (0.7, 0.5, 0.4, 0.3, 0.25, 0.2),
}


def get_config(arg: str = "exits_labels") -> ml_collections.ConfigDict:
    name, *flags = arg.split(",")
    options = dict(f.split("=", 1) for f in flags if "=" in f)
    teacher = options.get("teacher", TEACHER)
    c = ml_collections.ConfigDict()
    c.model = teacher
    c.task = "sst2"
    c.seed = 0
    c.train = ml_collections.ConfigDict({"batch_size": 32, "examples": 12_800, "steps": 400})
    if name in EXIT_RUNS:
        c.early_exit = ml_collections.ConfigDict()
        c.early_exit.layers = (1, 2, 3, 4, 5)
        c.early_exit.targets = "labels" if name.startswith("exits_labels") else "final"
        c.early_exit.pooling = "mean" if name.endswith("_mean") else "cls"
        c.train.lr = 5e-4  # new heads on frozen features
    elif name in RETENTION:
        c.token_keep = RETENTION[name]
        c.distill = ml_collections.ConfigDict({"teacher": teacher, "alpha": 1.0})
        c.train.lr = 5e-5
    else:
        raise ValueError(f"unknown dynamic config {name!r}; expected exits_* or {list(RETENTION)}")
    if "quick" in flags:
        c.train.examples, c.train.steps = 64, 2
        c.max_length, c.buckets = 64, (64,)
    return c
