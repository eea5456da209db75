"""Fine-tune the MiniLM teacher of each GLUE task with jaxcompress, and with HF PyTorch beside it.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/glue_teachers.py --tasks cola,mrpc,stsb,rte --torch

Each task's recipe is `configs/finetune.py:TASK`. The JAX fine-tune runs in
WORKDIR/TASK/jax (resumable; its `model/` is the task's teacher). With --torch the same recipe
(data order aside) also trains `BertForSequenceClassification` in PyTorch: AdamW over the same
parameter groups, the same warmup and linear decay, clipping, dropout, batch size and steps,
padding to each batch's longest sequence. Both are evaluated on the full dev set with
`jaxcompress.data.metrics`. Each finished task is kept in WORKDIR, and the result file is
rewritten after each, so an interrupted run loses at most the task it was in.
`--spread-seeds 1,2` also fine-tunes those seeds (WORKDIR/TASK/jax_s<seed>) and records the
metric over seeds as `seed_spread`; the teacher stays the recipe's seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from jaxcompress.config import load_config
from jaxcompress.data import glue, metrics
from jaxcompress.experiments.results import write_result
from jaxcompress.models.artefact import write_json
from jaxcompress.models.hf import resolve_model_dir
from jaxcompress.train import loop
from jaxcompress.train.inputs import get_num_outputs, glue_dir

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("glue_teachers")


def jax_row(config, workdir: Path) -> dict:
    """Fine-tune with jaxcompress (or reuse the finished run) and describe it."""
    summary = loop.train(config, workdir)
    return {
        "value": summary["value"],
        "eval": summary["eval"],
        "steps": summary["steps"],
        "train_s": summary["train_seconds_this_run"],
        "tokens_per_s": summary["tokens_per_s"],
        "model_dir": str(workdir / "model"),
    }


def torch_row(config) -> dict:
    """Fine-tune `BertForSequenceClassification` in PyTorch on the same recipe; dev metrics."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(config.seed)
    spec = glue.get_task(config.task)
    model_dir = resolve_model_dir(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    where = glue_dir(config)

    def encode(split: str):
        data = glue.load_split(config.task, split, where)
        texts = [list(data[k]) for k in spec.text_keys]
        enc = tokenizer(*texts, truncation=True, max_length=config.max_length)
        return enc["input_ids"], enc["token_type_ids"], np.asarray(data["label"])

    def batch(ids, types, labels, rows):
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        token_types = torch.zeros_like(input_ids)
        mask = torch.zeros_like(input_ids)
        for j, i in enumerate(rows):
            n = len(ids[i])
            input_ids[j, :n] = torch.tensor(ids[i])
            token_types[j, :n] = torch.tensor(types[i])
            mask[j, :n] = 1
        label_dtype = torch.float32 if spec.is_regression else torch.long
        target = torch.tensor(labels[rows], dtype=label_dtype)
        return input_ids, token_types, mask, target, int(mask.sum())

    train_ids, train_types, train_labels = encode("train")
    dev_ids, dev_types, dev_labels = encode(spec.eval_splits[0])
    model = BertForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=get_num_outputs(config.task),
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
    )
    t = config.train
    n = len(train_ids)
    per_epoch = n // t.batch_size
    steps = t.steps if t.steps > 0 else int(round(t.epochs * per_epoch))
    warmup = int(round(t.warmup_ratio * steps))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=t.lr,
        betas=(t.b1, t.b2),
        eps=t.eps,
    )

    def lr_factor(step: int) -> float:
        if step < warmup:
            return step / max(warmup, 1)
        return max(steps - step, 0) / max(steps - warmup, 1)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for step in range(steps):
        epoch, position = divmod(step, per_epoch)
        order = np.random.default_rng([config.seed, epoch]).permutation(n)
        rows = order[position * t.batch_size : (position + 1) * t.batch_size]
        input_ids, token_types, mask, target, real = batch(
            train_ids, train_types, train_labels, rows
        )
        out = model(
            input_ids=input_ids, token_type_ids=token_types, attention_mask=mask, labels=target
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += real
        if (step + 1) % 50 == 0 or step + 1 == steps:
            now = time.perf_counter()
            left = (now - t0) / (step + 1) * (steps - step - 1)
            log.info(
                "torch %s step %d/%d loss %.4f, %.0f s left",
                config.task,
                step + 1,
                steps,
                out.loss.item(),
                left,
            )
    train_s = time.perf_counter() - t0
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(dev_ids), config.eval.batch_size):
            rows = np.arange(start, min(start + config.eval.batch_size, len(dev_ids)))
            input_ids, token_types, mask, _, _ = batch(dev_ids, dev_types, dev_labels, rows)
            logits = model(input_ids=input_ids, token_type_ids=token_types, attention_mask=mask)
            outputs.append(logits.logits.float().numpy())
    scores = metrics.task_metrics(config.task, np.concatenate(outputs), dev_labels)
    return {
        "value": scores[metrics.main_metric(config.task)],
        "eval": {spec.eval_splits[0]: scores},
        "steps": steps,
        "train_s": train_s,
        "tokens_per_s": tokens / train_s,
        "torch": torch.__version__,
    }


def seed_spread(task: str, config, value: float, seeds: str, workdir: Path) -> dict:
    """The task metric of the recipe's seed (`value`) and of each of `seeds` (fine-tuned in
    WORKDIR/TASK/jax_s<seed>, resumable), with their mean and sample std."""
    values = {config.seed: value}
    for seed in map(int, seeds.split(",")):
        other = load_config(f"{REPO}/configs/finetune.py:{task}", [f"seed={seed}"])
        values[seed] = loop.train(other, workdir / task / f"jax_s{seed}")["value"]
        log.info("%s seed %d: %.4f", task, seed, values[seed])
    ordered = [values[s] for s in sorted(values)]
    return {
        **{f"s{s}": values[s] for s in sorted(values)},
        "mean": statistics.fmean(ordered),
        "std": statistics.stdev(ordered),
    }


def cached(path: Path, make) -> dict:
    """`make()`, kept as JSON at `path` so that a rerun reuses it."""
    if path.exists():
        return json.loads(path.read_text())
    row = make()
    write_json(path, row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sst2,cola,mrpc,stsb,rte")
    parser.add_argument("--workdir", default="runs/glue_teachers")
    parser.add_argument("--torch", action="store_true", help="also fine-tune in HF PyTorch")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/glue_teachers.json"))
    parser.add_argument("--note", default="", help="a note for the result file (how it ran)")
    parser.add_argument(
        "--spread-seeds",
        default="",
        help="more seeds of the JAX fine-tune (e.g. 1,2), trained only to measure the spread "
        "of the metric over seeds; the teacher stays the recipe's seed",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    workdir = Path(args.workdir)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    rows = {(r["task"], r["name"]): r for r in previous.get("rows", [])}
    for task in args.tasks.split(","):
        config = load_config(f"{REPO}/configs/finetune.py:{task}")
        spec = glue.get_task(task)
        recipe = {
            "epochs": config.train.epochs,
            "batch_size": config.train.batch_size,
            "lr": config.train.lr,
            "warmup_ratio": config.train.warmup_ratio,
            "weight_decay": config.train.weight_decay,
            "max_length": config.max_length,
            "seed": config.seed,
        }
        common = {
            "task": task,
            "metric": metrics.main_metric(task),
            "seeds": 1,
            "recipe": recipe,
        }
        made = {"jaxcompress": lambda c=config, d=workdir / task / "jax": jax_row(c, d)}
        if args.torch:
            made["hf_pytorch"] = lambda c=config: torch_row(c)
        for name, make in made.items():
            t0 = time.perf_counter()
            row = cached(workdir / task / f"{name}.json", make)
            log.info(
                "%s %s: %s %.4f (%.0f s)",
                task,
                name,
                common["metric"],
                row["value"],
                time.perf_counter() - t0,
            )
            split = spec.eval_splits[0]
            dev = len(glue.load_split(task, split, glue_dir(config)))
            rows[(task, name)] = {**common, "name": name, **row, "dev_examples": dev}
        if args.spread_seeds:
            rows[(task, "jaxcompress")]["seed_spread"] = seed_spread(
                task, config, rows[(task, "jaxcompress")]["value"], args.spread_seeds, workdir
            )
        ours, theirs = rows.get((task, "jaxcompress")), rows.get((task, "hf_pytorch"))
        if ours and theirs:
            ours["hf_pytorch_value"] = theirs["value"]
        ordered = sorted(rows.values(), key=lambda r: (r["task"], r["name"]))
        body = {"rows": ordered, **({"note": args.note} if args.note else {})}
        write_result(args.out, "glue_teachers", body)
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
