"""The survey's Table 1 over five GLUE tasks: the main comparison, per task, from its teacher.

  jaxcompress sweep configs/ablations/glue.py:rte --workdir runs/glue/rte
  jaxcompress sweep configs/ablations/glue.py:rte,gobo --workdir runs/glue/rte_gobo
  ...  (sst2, cola, mrpc, stsb, rte; each with and without `gobo`)
  jaxcompress report runs/glue/* --allow-mixed --out benchmarks/results/ablation_glue

or all of it a run at a time, seed by seed, kept across sessions: benchmarks/glue_grid.py.

The argument is `TASK[,gobo][,quick][,teacher=PATH]`. Each task's teacher is its own
fine-tune of all-MiniLM-L6-v2 (`benchmarks/glue_teachers.py` writes it to
runs/glue_teachers/TASK/jax/model; SST-2 uses the fixed minilm-l6-sst2-teacher of every
SST-2 benchmark); `teacher=PATH` names another. Every student is distilled from it (logits,
alpha 0.5, temperature 2; MSE for STS-B's scores), 3 seeds:

- `qat_w8a8`: Q8BERT, 8-bit weights and embeddings, 8-bit inputs of every dense layer;
- `qat_w4_group`: 4-bit weights with a scale per 128 rows, 8-bit embeddings;
- `heads_kd h50`: half the heads by Michel et al.'s importance (5 rounds);
- `layers_tinybert l3`: every other layer kept (6 -> 3), TinyBERT's layer terms;
- `low_rank_ffn r50`: FFN kernels at half their rank;
- `factorize e128`: word embeddings V x 128 x H;
- `combined_kd l3_h50_f50`: 3 layers, half the heads and half the FFN neurons, three times
  the budget (about a quarter of the teacher's compute a step).

`gobo` is the other sweep of a task: GOBO's 3-bit weights with no training (one seed: it
is deterministic). The recovery budget, stated per task: SST-2 400 steps of batch 32 on a
fixed 12,800-sentence subset (as configs/ablations/sst2.py); the small tasks three epochs of
their whole train set (RTE 2,490 pairs, MRPC 3,668, STS-B 5,749, CoLA 8,551).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASKS = ("sst2", "cola", "mrpc", "stsb", "rte")
SST2_TEACHER = "minilm-l6-sst2-teacher"
BUDGET = {"sst2": {"steps": 400, "examples": 12800}, "default": {"epochs": 3.0}}


def teacher_of(task: str) -> str:
    """The task's teacher: the fixed SST-2 one, or benchmarks/glue_teachers.py's fine-tune."""
    if task == "sst2":
        return SST2_TEACHER
    # Relative to the repository root, where sweeps of this file run: a run's key hashes the
    # teacher's path, so an absolute one would tie the archived runs to one checkout's place.
    path = Path("runs") / "glue_teachers" / task / "jax" / "model"
    if not (path / "config.json").is_file():
        where = "" if Path.cwd().resolve() == REPO else f" (run from the repository root, {REPO})"
        raise ValueError(
            f"no {task} teacher at {path}{where}: fine-tune it first (python "
            f"benchmarks/glue_teachers.py --tasks {task}) or pass teacher=PATH"
        )
    return str(path)


def student(transforms: tuple[str, ...] = (), lr: float = 5e-5, **changes) -> dict:
    return {"student": {"transforms": transforms, "train": {"lr": lr}, **changes}}


def variants(quick: bool, budget: dict) -> dict:
    group = 8 if quick else 128
    embedding = 16 if quick else 128

    def longer(variant: dict) -> dict:  # three times the steps (or epochs) of the others
        train = variant["student"]["train"]
        if "steps" in budget:
            train["steps"] = 3 * budget["steps"]
        else:
            train["epochs"] = 3 * budget["epochs"]
        return variant

    def quantized(kernels: str, embeddings: str, activation_bits: int = 0, lr=5e-5) -> dict:
        q = {"kernels": kernels, "embeddings": embeddings, "activation_bits": activation_bits}
        return student(lr=lr, quantize=q)

    layers = {"hidden": 1.0, "attention": 1.0, "embedding": 1.0, "cache_logits": False}
    keep3 = "keep_layers(keep=3, strategy='every_other')"
    heads = "prune_heads(fraction=0.5, steps=5)"
    neurons = "prune_ffn(fraction=0.5, scope='layer')"
    return {
        "qat_w8a8": {"q8bert": quantized("bits=8", "bits=8,granularity='tensor'", 8, lr=1e-5)},
        "qat_w4_group": {
            "g128": quantized(f"bits=4,granularity='group',group_size={group}", "bits=8")
        },
        "heads_kd": {"h50": student((heads,))},
        "layers_tinybert": {"l3": student((keep3,), 1e-4, distill=layers)},
        "low_rank_ffn": {"r50": student(("low_rank(target='ffn', fraction=0.5)",))},
        "factorize": {
            f"e{embedding}": student(
                (f"factorize_embeddings(embedding_size={embedding}, init='frequency_svd')",)
            )
        },
        "combined_kd": {"l3_h50_f50": longer(student((keep3, heads, neurons), 1e-4))},
    }


def get_config(arg: str = "sst2") -> dict:
    task, *flags = arg.split(",")
    options = dict(flag.partition("=")[::2] for flag in flags)
    if unknown := set(options) - {"quick", "teacher", "gobo"}:
        raise ValueError(f"unknown flags {sorted(unknown)}; known: gobo, quick, teacher=PATH")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    quick = "quick" in options
    teacher = options.get("teacher") or teacher_of(task)
    seeds = (0,) if quick else (0, 1, 2)
    if "gobo" in options:
        gobo = {"name": "gobo", "kind": "gobo", "model": teacher, "kernels": 3, "embeddings": 0}
        return {
            "name": f"{task}_gobo",
            "recipe": {"task": task, "stages": (gobo,)},
            "variants": {"gobo": {"w3": {}}},
            "seeds": (0,),  # deterministic: no data, no training
            "measure": "gobo",
            "reference": teacher,
            "latency": not quick,
        }
    budget = BUDGET.get(task, BUDGET["default"])
    train = {"batch_size": 32, "warmup_ratio": 0.06, **budget}
    if quick:
        budget = train = {"batch_size": 16, "steps": 2, "examples": 64}
    config = {
        "model": teacher,
        "distill": {"teacher": teacher, "alpha": 0.5, "temperature": 2.0, "cache_logits": True},
        "train": train,
        "checkpoint_every": 1 if quick else 100,
    }
    if quick:  # one compiled shape, a dev slice, 2 calibration batches
        config |= {
            "max_length": 64,
            "buckets": (64,),
            "eval": {"examples": 256},
            "quantize": {"calibration_batches": 2},
        }
    stage = {"name": "student", "kind": "finetune", "config": config}
    return {
        "name": f"{task}_main",
        "recipe": {"task": task, "stages": (stage,)},
        "variants": variants(quick, budget),
        "seeds": seeds,
        "measure": "student",
        "reference": teacher,
        "latency": not quick,
    }
