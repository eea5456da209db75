"""Survey-style ablations on SST-2 from the MiniLM teacher, one sweep per method family.

  jaxcompress sweep configs/ablations/sst2.py:main --workdir runs/ablation_sst2
  jaxcompress report runs/ablation_sst2 --out benchmarks/results/ablation_sst2

Families (the argument): `decomposition` (factorized embeddings E=128/64 with token-
frequency-weighted SVD init; low-rank FFN at 50%/25% of full rank), `sharing` (cross-layer
sharing of all layers, pairs, triples), `distillation` (6 -> 3 and 6 -> 2 layers by logit KD
and by TinyBERT's layer terms), `combined` (a 3-layer student that is also factorized or
low-rank), `quantization` (quantization-aware training: Q8BERT's 8-bit weights and
activations; 4-bit group-wise weights; Q-BERT's Hessian-chosen mixed precision at 3 bits on
average; TernaryBERT's ternary weights and 8-bit activations with layer distillation),
`combined_staged` (the `combined_kd` student built depth first: 3 layers distilled
TinyBERT's way, then half the heads and FFN neurons removed and recovered),
`sharing_gradual` (all-layer sharing imposed at once or reached gradually while
distilling TinyBERT's way), `binarybert`
(binary weights the BinaryBERT way: the TernaryBERT run of `quantization`, shared when both
run in one workdir, split by ternary weight splitting into binary halves and trained on as
binary weights, embeddings too, with 8-bit activations and layer distillation), `pruning`
(magnitude pruning to 50% and 90% sparsity, movement pruning to 10% remaining (from the
teacher, with scores trained by Adam and with summed scores, and Sanh et al.'s way: from the
pre-trained model, 1,200 steps), 50% of heads by Michel et al.'s importance, 50% of FFN
neurons, 6 -> 3 layers by four of Poor Man's BERT's strategies, and heads + FFN + layers
combined, trained 1,200 steps, by logits and also with hidden-state terms; all distilled
from the teacher), and `main` (the committed comparison: factorized embeddings, low-rank FFN
and layer dropping with distillation, two strengths each). Every run recovers or trains by
distillation from the teacher for 400 steps of batch 32: one pass over a fixed random
12,800-example subset of the train set (a fifth of it), on seeds 0, 1, 2; it is measured on
the full dev set with paired CPU latency.

Flags after the family: `quick` (runlocal: 2 steps on 64 examples, one seed, small
strengths, one padded length of 64, the first 256 dev sentences, no latency: what the tests
run), `teacher=PATH` (another
teacher; the tests pass a tiny random model).
"""

from jaxcompress.experiments.sweep import deep_merge

TEACHER = "minilm-l6-sst2-teacher"
BASE = "sentence-transformers/all-MiniLM-L6-v2"  # what the teacher was fine-tuned from


def student(transforms: tuple[str, ...], lr: float = 5e-5, **distill) -> dict:
    """The changes to the `student` stage for one variant."""
    return {"student": {"transforms": transforms, "train": {"lr": lr}, "distill": distill}}


def families(quick: bool) -> dict[str, dict]:
    e_large, e_small = (16, 8) if quick else (128, 64)

    def factorize(e: int) -> str:
        return f"factorize_embeddings(embedding_size={e}, init='frequency_svd')"

    def keep(n: int, strategy: str = "every_other") -> str:
        return f"keep_layers(keep={n}, strategy='{strategy}')"

    def heads(fraction: float) -> str:  # Michel et al.: iterative, 5 rounds, global
        return f"prune_heads(fraction={fraction}, steps=5)"

    def neurons(fraction: float) -> str:
        return f"prune_ffn(fraction={fraction}, scope='layer')"

    def longer(variant: dict) -> dict:
        variant["student"]["train"]["steps"] = 6 if quick else 1200
        return variant

    def pruned(method: str, sparsity: float, begin=0.0, end=0.5, lr=5e-5) -> dict:
        """Unstructured pruning of the encoder's dense kernels during distillation."""
        variant = student((), lr)
        variant["student"]["prune"] = {
            "method": method,
            "sparsity": sparsity,
            "begin": begin,
            "end": end,
            "frequency": 2 if quick else 10,
        }
        return variant

    def summed(variant: dict) -> dict:
        variant["student"]["prune"]["score_update"] = "sum"
        return variant

    def from_fine_tune(variant: dict, magnitude: float) -> dict:
        """Movement scores start at each weight's movement in the teacher's own fine-tune
        from BASE (|W| - |W_base|), the paper's score warm-up already paid for, plus a
        `magnitude` multiple of |W_base|."""
        variant["student"]["prune"].update(scores_from=BASE, score_magnitude=magnitude)
        return variant

    def pretrained(variant: dict) -> dict:
        """Start the student from the pre-trained model (a fresh classifier), not the teacher."""
        variant["student"]["model"] = BASE
        return variant

    ffn = "low_rank(target='ffn', fraction={})".format
    group = 8 if quick else 128  # rows per scale group (Q-BERT's group-wise quantization)

    def quantized(kernels: str, embeddings: str, activation_bits: int = 0, lr=5e-5, **distill):
        quantize = {"kernels": kernels, "embeddings": embeddings}
        quantize["activation_bits"] = activation_bits
        return {"student": {**student((), lr, **distill)["student"], "quantize": quantize}}

    def qbert(budget: float) -> dict:
        """Q-BERT: per-layer bits (2, 3, 4 or 8) by Hessian trace, group-wise scales."""
        variant = quantized(f"bits=8,granularity='group',group_size={group}", "bits=8")
        variant["student"]["quantize"].update(
            mixed_bits_budget=budget, mixed_group_size=group, hessian_samples=2 if quick else 16
        )
        return variant

    def sparsity_curve() -> dict:
        makers = {
            "magnitude_kd": lambda s: pruned("magnitude", s, 0.1, 0.7, 1e-4),
            "movement_ft_kd": lambda s: from_fine_tune(pruned("movement", s, 0.1, 0.7, 1e-4), 0.2),
            "movement_ft_once_kd": lambda s: from_fine_tune(
                pruned("movement", s, 0.0, 0.0, 1e-4), 0.05
            ),
        }
        curve = {
            technique: {f"r{round(100 * (1 - s))}": make(s) for s in (0.9, 0.95, 0.97, 0.8, 0.5)}
            for technique, make in makers.items()
        }
        curve["movement_ft_once_kd"]["r10_long"] = longer(makers["movement_ft_once_kd"](0.9))
        for technique in ("magnitude_kd", "movement_ft_once_kd"):  # one pass over all of it
            variant = makers[technique](0.9)
            variant["student"] = deep_merge(variant["student"], whole_epoch(quick))
            curve[technique]["r10_epoch"] = variant
        return curve

    layers = {"hidden": 1.0, "attention": 1.0, "embedding": 1.0, "cache_logits": False}

    def ternary() -> dict:
        return quantized("scheme='ternary'", "scheme='ternary'", 8, lr=1e-4, **layers)

    return {
        "decomposition": {
            "factorize": {
                f"e{e_large}": student((factorize(e_large),)),
                f"e{e_small}": student((factorize(e_small),)),
            },
            "low_rank_ffn": {"r50": student((ffn(0.5),)), "r25": student((ffn(0.25),))},
        },
        "sharing": {
            "share_layers": {
                "all": student(("share_layers(groups='all')",), lr=1e-4),
                "every3": student(("share_layers(groups='every:3')",), lr=1e-4),
                "every2": student(("share_layers(groups='every:2')",), lr=1e-4),
            },
        },
        "distillation": {
            "kd_logits": {"l3": student((keep(3),), 1e-4), "l2": student((keep(2),), 1e-4)},
            "kd_tinybert": {
                "l3": student((keep(3),), 1e-4, **layers),
                "l2": student((keep(2),), 1e-4, **layers),
            },
        },
        "combined": {
            "l3_plus": {
                f"e{e_large}": student((keep(3), factorize(e_large)), 1e-4),
                "ffn50": student((keep(3), ffn(0.5)), 1e-4),
            },
        },
        "quantization": {
            # From the fine-tuned teacher, 8 bits needs only a gentle recovery: at lr 5e-5 the
            # fine-tune itself moved seed 0 to 0.8807 (0.990); Q8BERT's own runs start
            # from the pre-trained model instead.
            "qat_w8a8": {"q8bert": quantized("bits=8", "bits=8,granularity='tensor'", 8, lr=1e-5)},
            "qat_weights": {
                "w4_group": quantized(f"bits=4,granularity='group',group_size={group}", "bits=8")
            },
            "qat_qbert": {"mixed3": qbert(3.0)},
            "qat_ternary_kd": {
                "w2a8": ternary(),
                # The paper's budget is epochs: one pass over the whole train set (2,104 steps)
                "w2a8_epoch": deep_merge(ternary(), {"student": whole_epoch(quick)}),
            },
        },
        "pruning": {
            "magnitude_kd": {
                "s50": pruned("magnitude", 0.5, end=0.5),
                "s90": pruned("magnitude", 0.9, end=0.7, lr=1e-4),
            },
            "movement_kd": {
                "r10": pruned("movement", 0.9, begin=0.1, end=0.7, lr=1e-4),
                # Scores as Sanh et al. define them, -sum of dL/dW' * W (not trained by Adam,
                # which divides each weight's size out of its score's steps)
                "r10_summed": summed(pruned("movement", 0.9, begin=0.1, end=0.7, lr=1e-4)),
                # Sanh et al. prune while fine-tuning the pre-trained model: from the
                # fine-tuned teacher itself the distillation gradient starts at zero, so
                # movement scores see only noise.
                "r10_pretrained": longer(
                    pretrained(pruned("movement", 0.9, begin=0.1, end=0.7, lr=1e-4))
                ),
            },
            "heads_kd": {"h50": student((heads(0.5),))},
            # Scores from the teacher's fine-tune; the `sparsity` family has the whole curve.
            "movement_ft_kd": {"r10": from_fine_tune(pruned("movement", 0.9, 0.1, 0.7, 1e-4), 0.2)},
            "ffn_kd": {"f50": student((neurons(0.5),))},
            "layers_kd": {
                s: student((keep(3, s),), 1e-4)
                for s in ("drop_top", "alternate", "symmetric", "contribution")
            },
            # About 4x less compute per step than the teacher, so three passes over the
            # subset cost what one pass of the other rows does.
            "combined_kd": {
                "l3_h50_f50": longer(student((keep(3), heads(0.5), neurons(0.5)), 1e-4)),
                # + TinyBERT's hidden-state and embedding terms (the widths are unchanged)
                "l3_h50_f50_hidden": longer(
                    student(
                        (keep(3), heads(0.5), neurons(0.5)),
                        1e-4,
                        hidden=1.0,
                        embedding=1.0,
                        cache_logits=False,
                    )
                ),
            },
        },
        # Accuracy against weights kept: magnitude pruning on Zhu & Gupta's schedule (10%
        # warm-up, cubic to the target by 70% of the run) and movement pruning with scores
        # from the teacher's fine-tune, on the same schedule (magnitude prior 0.2) and all at
        # once when the run starts (prior 0.05): benchmarks/results/movement_oneshot.json
        # has how each prior ranks the teacher's weights at each sparsity.
        "sparsity": sparsity_curve(),
        "main": {
            "factorize": {
                f"e{e_large}": student((factorize(e_large),)),
                f"e{e_small}": student((factorize(e_small),)),
            },
            "low_rank_ffn": {"r50": student((ffn(0.5),)), "r25": student((ffn(0.25),))},
            "layer_drop_kd": {"l3": student((keep(3),), 1e-4), "l2": student((keep(2),), 1e-4)},
        },
    }


QUICK = {
    "max_length": 64,
    "buckets": (64,),
    "eval": {"examples": 256},
    "quantize": {"calibration_batches": 2},
}


def get_config(arg: str = "main") -> dict:
    family, *flags = arg.split(",")
    options = dict(flag.partition("=")[::2] for flag in flags)
    if unknown := set(options) - {"quick", "teacher"}:
        raise ValueError(f"unknown flags {sorted(unknown)}; known: quick, teacher=PATH")
    quick = "quick" in options
    teacher = options.get("teacher") or TEACHER
    variants = families(quick)
    known = sorted([*variants, "binarybert", "combined_staged", "sharing_gradual"])
    if family not in known:
        raise ValueError(f"unknown family {family!r}; choose from {known}")
    train = {"batch_size": 32, "steps": 400, "examples": 12800, "warmup_ratio": 0.06}
    if quick:
        train = {"batch_size": 16, "steps": 2, "examples": 64}
    stage = {
        "name": "student",
        "kind": "finetune",
        "config": {
            "model": teacher,
            "distill": {"teacher": teacher, "alpha": 0.5, "temperature": 2.0, "cache_logits": True},
            "train": train,
            "checkpoint_every": 1 if quick else 100,
            # quick: one compiled shape, a 256-sentence slice of the dev set, 2 calibration batches
            **(QUICK if quick else {}),
        },
    }
    sweep = {
        "name": f"sst2_{family}",
        "recipe": {"task": "sst2", "stages": (stage,)},
        "variants": variants.get(family, {}),
        "seeds": (0,) if quick else (0, 1, 2),
        "measure": "student",
        "reference": teacher,
        "latency": not quick,
    }
    if family == "combined_staged":
        return combined_staged(sweep, quick)
    if family == "sharing_gradual":
        return sharing_gradual(sweep, quick)
    if family == "binarybert":
        return binarybert(sweep, variants["quantization"], quick)
    return sweep


def combined_staged(sweep: dict, quick: bool) -> dict:
    """Depth first, then width: `layers` distils the teacher's layers 2, 4, 6 TinyBERT's way
    (hidden states, attention, embeddings and logits) for 1,200 steps, while the student
    still has every head, so the attention term applies; `student` then removes half its
    heads and half its FFN neurons and recovers for 1,200 steps by logit distillation.
    `l3_h50_f50_all` draws the `layers` stage's examples from the whole train set."""
    (stage,) = sweep["recipe"]["stages"]
    steps = 6 if quick else 1200
    tinybert = {"hidden": 1.0, "attention": 1.0, "embedding": 1.0, "cache_logits": False}
    layers = deep_merge(
        stage["config"],
        {
            "transforms": ("keep_layers(keep=3, strategy='every_other')",),
            "train": {"lr": 1e-4, "steps": steps},
            "distill": tinybert,
        },
    )
    width = ("prune_heads(fraction=0.5, steps=5)", "prune_ffn(fraction=0.5, scope='layer')")
    student = deep_merge(
        stage["config"],
        {"model": "@layers", "transforms": width, "train": {"lr": 1e-4, "steps": steps}},
    )
    return {
        **sweep,
        "recipe": {
            "task": "sst2",
            "stages": (
                {"name": "layers", "kind": "finetune", "config": layers},
                {**stage, "config": student},
            ),
        },
        "variants": {
            "combined_staged": {
                "l3_h50_f50": {"student": {}},
                # TinyBERT distils over the whole train set: the same 1,200 steps, new examples
                # throughout instead of three passes over the 12,800-example subset
                "l3_h50_f50_all": {"layers": {"train": {"examples": -1}}},
            }
        },
        "seeded": ("layers", "student"),
    }


def sharing_gradual(sweep: dict, quick: bool) -> dict:
    """ALBERT's all-layer sharing reached while training: `student` distils the teacher
    TinyBERT's way (logits, hidden states, attention, embeddings) for 800 steps at lr 1e-4
    (the best post-hoc sharing run's recipe) while each layer blends into the mean of all
    six (`share` section); `shared` stores the six identical layers as one. `at_once` shares
    from the first step (post-hoc sharing, trained the same way), `gradual` blends linearly
    over the first 10-60% of training, `gradual_logits` too but by logit distillation only;
    `at_once_long` trains 2,400 steps on the whole train set, `at_once_3ep` three epochs."""
    (stage,) = sweep["recipe"]["stages"]
    tinybert = {"hidden": 1.0, "attention": 1.0, "embedding": 1.0, "cache_logits": False}
    steps = 6 if quick else 800
    student = deep_merge(
        stage["config"],
        {"train": {"lr": 1e-4, "steps": steps}, "distill": tinybert, "share": {"groups": "all"}},
    )
    three_epochs = {"steps": 6} if quick else {"steps": -1, "epochs": 3.0, "examples": -1}
    shared = {
        "name": "shared",
        "kind": "transform",
        "model": "@student",
        "transforms": ("share_layers(groups='all')",),
    }
    return {
        **sweep,
        "recipe": {"task": "sst2", "stages": ({**stage, "config": student}, shared)},
        "variants": {
            "share_all": {
                "at_once": {"student": {"share": {"begin": 0.0, "end": 0.0}}},
                # three times the steps, new examples throughout (the whole train set)
                "at_once_long": {
                    "student": {
                        "share": {"begin": 0.0, "end": 0.0},
                        "train": {"steps": 6 if quick else 2400, "examples": -1},
                    }
                },
                # three epochs, the dev set measured every half epoch (the learning curve)
                "at_once_3ep": {
                    "student": {
                        "share": {"begin": 0.0, "end": 0.0},
                        "train": three_epochs,
                        "eval": {"every_steps": 2 if quick else 1052},
                    }
                },
                "gradual": {"student": {"share": {"begin": 0.1, "end": 0.6}}},
                # logit distillation only: one shared layer cannot match six teacher layers
                "gradual_logits": {
                    "student": {
                        "share": {"begin": 0.1, "end": 0.6},
                        "distill": {"hidden": 0.0, "attention": 0.0, "embedding": 0.0},
                    }
                },
            }
        },
        "seeded": ("student",),
        "measure": "shared",
    }


def whole_epoch(quick: bool) -> dict:
    """A stage change: one pass over the whole train set instead of the 400-step subset,
    with the dev set measured every 700 steps (the learning curve)."""
    if quick:
        return {"train": {"steps": 4}, "eval": {"every_steps": 2}}
    return {"train": {"steps": -1, "examples": -1}, "eval": {"every_steps": 700}}


def binarybert(sweep: dict, quantization: dict, quick: bool) -> dict:
    """Two stages: the TernaryBERT variant of `quantization` as `student` (the same stage,
    hash and directory), then `binary`, which splits it and trains binary halves."""
    (stage,) = sweep["recipe"]["stages"]
    change = quantization["qat_ternary_kd"]["w2a8"]["student"]
    ternary = {**stage, "config": deep_merge(stage["config"], change)}
    quantize = {"kernels": "scheme='binary'", "embeddings": "scheme='binary'", "binary_split": True}
    binary = {
        "name": "binary",
        "kind": "finetune",
        "config": deep_merge(ternary["config"], {"model": "@student", "quantize": quantize}),
    }
    return {
        **sweep,
        "recipe": {"task": "sst2", "stages": (ternary, binary)},
        "variants": {
            "qat_binary_tws": {
                "w1a8_tws": {"binary": {}},
                # Both stages a whole epoch: the TernaryBERT run of `w2a8_epoch`, then binary
                "w1a8_tws_epoch": {"student": whole_epoch(quick), "binary": whole_epoch(quick)},
            }
        },
        "seeded": ("student", "binary"),
        "measure": "binary",
    }
