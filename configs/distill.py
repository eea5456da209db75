"""Task-specific distillation of the SST-2 teacher into smaller students.

  jaxcompress finetune --config configs/distill.py:l3,tinybert --workdir runs/distill/l3_tinybert

The argument is `student,objective[,quick]`. Students, built from the teacher by transforms:
`l3` and `l2` (every other / evenly spaced teacher layers, so 6 -> 3 keeps layers 2, 4, 6),
`l3_h256` (3 layers sliced to H = 256, 8 heads, FFN 1024). Objectives: `logits` (Hinton KD
mixed with the task loss), `hidden` (+ layer-output MSE, projected when narrower),
`tinybert` (+ embedding MSE and per-head attention KL), `minilm` (logits + the last layer's
attention distribution and value relation), `minilmv2` (logits + query/key/value relations
over 8 relation heads: any widths and head counts). `quick` trains 30 steps, `long` 1,200.
"""

import ml_collections

TEACHER = "minilm-l6-sst2-teacher"
STUDENTS = {
    "l3": ("keep_layers(keep=3, strategy='every_other')",),
    "l2": ("keep_layers(keep=2, strategy='every_other')",),
    "l3_h256": (
        "keep_layers(keep=3, strategy='every_other')",
        "shrink_width(hidden_size=256, num_heads=8, intermediate_size=1024)",
    ),
}
OBJECTIVES = {
    "logits": {},
    "hidden": {"hidden": 1.0},
    "tinybert": {"hidden": 1.0, "embedding": 1.0, "attention": 1.0},
    "minilm": {"relation": 1.0},
    "minilmv2": {"relation": 1.0, "relation_heads": 8},
}


def get_config(arg: str = "l3,logits") -> ml_collections.ConfigDict:
    student, objective, *flags = arg.split(",")
    if student not in STUDENTS or objective not in OBJECTIVES:
        raise ValueError(
            f"unknown {arg!r}: students {sorted(STUDENTS)}, objectives {sorted(OBJECTIVES)}"
        )
    if unknown := set(flags) - {"quick", "long"}:
        raise ValueError(f"unknown flags {sorted(unknown)}; known: quick, long")
    c = ml_collections.ConfigDict()
    c.model = TEACHER
    c.task = "sst2"
    c.transforms = STUDENTS[student]
    c.distill = ml_collections.ConfigDict(
        {"teacher": TEACHER, "alpha": 0.5, "temperature": 2.0, **OBJECTIVES[objective]}
    )
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.steps = 30 if "quick" in flags else 1200 if "long" in flags else 400
    c.train.lr = 1e-4
    c.train.warmup_ratio = 0.06
    c.checkpoint_every = 200
    return c
