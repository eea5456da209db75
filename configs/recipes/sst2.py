"""Compression recipes on SST-2 from the MiniLM teacher (run with `jaxcompress recipe`).

  jaxcompress recipe --config configs/recipes/sst2.py:distil_l3 --workdir runs/recipe_l3

Recipes: `distil_l3` (the teacher's layers 2, 4, 6 as a 3-layer student, distilled with
logits, hidden states and attention in one stage, then evaluated against the teacher);
`tinybert` (the same student trained TinyBERT's way: intermediate layers first, then the
prediction layer); `assistant` (teacher -> 4-layer assistant -> 2-layer student, Mirzadeh
et al.). Add `,quick` to train every stage for 100 steps only.
"""

TEACHER = "minilm-l6-sst2-teacher"
TRAIN = {"batch_size": 32, "steps": 400, "lr": 1e-4, "warmup_ratio": 0.06}


def distil(name: str, model: str, teacher: str, transforms=(), steps=None, **distill) -> dict:
    train = dict(TRAIN, steps=steps or TRAIN["steps"])
    return {
        "name": name,
        "kind": "finetune",
        "config": {
            "model": model,
            "transforms": tuple(transforms),
            "distill": {"teacher": teacher, **distill},
            "train": train,
            "checkpoint_every": 100,
        },
    }


def evaluate(*models: str) -> dict:
    return {"name": "evaluate", "kind": "evaluate", "models": models, "latency": True}


def get_config(arg: str = "distil_l3") -> dict:
    name, *flags = arg.split(",")
    if unknown := set(flags) - {"quick"}:
        raise ValueError(f"unknown flags {sorted(unknown)}; known: quick")
    keep3 = ("keep_layers(keep=3, strategy='every_other')",)
    tinybert = {"hidden": 1.0, "attention": 1.0, "embedding": 1.0}
    if name == "distil_l3":
        stages = [
            distil("student", TEACHER, TEACHER, keep3, alpha=0.5, **tinybert),
            evaluate("@student", TEACHER),
        ]
    elif name == "tinybert":
        stages = [
            distil("intermediate", TEACHER, TEACHER, keep3, prediction=0.0, **tinybert),
            distil("prediction", "@intermediate", TEACHER, alpha=1.0, temperature=1.0),
            evaluate("@prediction", TEACHER),
        ]
    elif name == "assistant":
        stages = [
            distil("assistant", TEACHER, TEACHER, ("keep_layers(keep=4)",), **tinybert),
            distil("student", "@assistant", "@assistant", ("keep_layers(keep=2)",), **tinybert),
            evaluate("@student", "@assistant", TEACHER),
        ]
    else:
        raise ValueError(f"unknown recipe {name!r}; choose distil_l3, tinybert or assistant")
    if "quick" in flags:
        for stage in stages:
            if stage["kind"] == "finetune":
                stage["config"]["train"]["steps"] = 100
    return {"task": "sst2", "stages": tuple(stages)}
