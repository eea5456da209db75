"""Training speed: jaxcompress (jitted, length-bucketed) against Hugging Face PyTorch, same machine.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/train_speed.py

Two comparisons, both in this one process, one after the other:
1. One optimizer step at identical shapes (MiniLM, batch 32, sequence 64 and 128, no padding):
   our jitted train step vs `BertForSequenceClassification` in PyTorch eager with AdamW.
   Median of timed steps after warm-up.
2. One pass over the same fixed slice of the SST-2 train set: `jaxcompress` fine-tuning
   (length bucketing) vs the Hugging Face `Trainer` with dynamic padding (each batch padded to
   its longest example), same hyperparameters. Wall time of the training loop, compile included.
Writes benchmarks/results/train_speed.json with `ratio_vs_pytorch` = our throughput / theirs.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import torch
import transformers
from timing import median_seconds, random_batch

from jaxcompress.compress.distill import objective as objectives
from jaxcompress.config import load_config
from jaxcompress.data import glue as data
from jaxcompress.experiments.results import write_result
from jaxcompress.models.bert import Bert
from jaxcompress.models.hf import load_pretrained, resolve_model_dir
from jaxcompress.train import loop as train
from jaxcompress.train.evaluate import evaluate_model
from jaxcompress.train.inputs import load_eval_splits, load_task_splits, load_tokenizer
from jaxcompress.train.step import TrainState, make_optimizer, make_train_step, new_rng

REPO = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def time_jax_step(config, batch_size: int, length: int, steps: int) -> float:
    """Median seconds of one jitted train step (forward, backward, AdamW) at a fixed shape."""
    bert_config, params = load_pretrained(MODEL, num_labels=2)
    tx = make_optimizer(config.train, 10_000)
    state = TrainState(jnp.array(0), params, tx.init(params), new_rng(0))
    step = make_train_step(objectives.finetune_loss(Bert(bert_config)), tx)
    batch = random_batch(batch_size, length)

    def run():
        nonlocal state
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])

    return median_seconds(run, steps)


def time_torch_step(config, batch_size: int, length: int, steps: int) -> float:
    """Median seconds of one PyTorch eager step of HF BertForSequenceClassification."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        resolve_model_dir(MODEL), num_labels=2
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=0.01)
    batch = random_batch(batch_size, length)
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = torch.from_numpy(batch["labels"]).long()
    mask = torch.ones_like(ids)

    def run():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return median_seconds(run, steps)


def same_shape_rows(config, steps: int) -> list[dict]:
    rows = []
    for length in (64, 128):
        ours = time_jax_step(config, 32, length, steps)
        theirs = time_torch_step(config, 32, length, steps)
        tokens = 32 * length
        rows.append(
            {
                "name": f"train_step_b32_l{length}",
                "comparison": "one optimizer step at identical shapes, no padding",
                "batch_size": 32,
                "seq_len": length,
                "ours_step_s": ours,
                "pytorch_step_s": theirs,
                "ours_tokens_per_s": tokens / ours,
                "pytorch_tokens_per_s": tokens / theirs,
                "metric": "throughput_ratio_vs_pytorch",
                "value": theirs / ours,
                "ratio_vs_pytorch": theirs / ours,
                "timed_steps": steps,
            }
        )
        print(f"L={length}: ours {ours * 1e3:.0f} ms/step, pytorch {theirs * 1e3:.0f} ms/step")
    return rows


class CountingCollator:
    """Dynamic padding (pad to the batch's longest example) that counts padded tokens."""

    def __init__(self, tokenizer):
        self.inner = transformers.DataCollatorWithPadding(tokenizer)
        self.padded_tokens = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.padded_tokens += batch["input_ids"].numel()
        return batch


def trainer_pass(config, split: data.TokenizedSplit, workdir: Path) -> dict:
    """One pass of the HF Trainer over the slice; returns its timing and saved model."""
    import datasets

    rows = datasets.Dataset.from_dict(
        {
            "input_ids": [x.tolist() for x in split.input_ids],
            "token_type_ids": [x.tolist() for x in split.token_type_ids],
            "attention_mask": [[1] * len(x) for x in split.input_ids],
            "labels": split.labels.tolist(),
        }
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_dir(MODEL))
    collator = CountingCollator(tokenizer)
    model = transformers.BertForSequenceClassification.from_pretrained(
        resolve_model_dir(MODEL), num_labels=2
    )
    args = transformers.TrainingArguments(
        output_dir=str(workdir / "hf_trainer"),
        per_device_train_batch_size=config.train.batch_size,
        num_train_epochs=1,
        learning_rate=config.train.lr,
        weight_decay=config.train.weight_decay,
        warmup_steps=int(config.train.warmup_ratio * len(split) / config.train.batch_size),
        max_grad_norm=config.train.clip_norm,
        lr_scheduler_type="linear",
        save_strategy="no",
        report_to=[],
        logging_steps=50,
        seed=config.seed,
        use_cpu=True,
        dataloader_drop_last=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows, data_collator=collator
    )
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    out = workdir / "hf_trainer_model"
    trainer.save_model(str(out))
    return {
        "wall_s": wall,
        "steps": result.global_step,
        "padded_tokens": collator.padded_tokens,
        "model_dir": out,
    }


def dev_accuracy(config, model_dir: Path) -> float:
    splits = load_eval_splits(config, load_tokenizer(config))
    return evaluate_model(config, *load_pretrained(model_dir), splits)["validation"]["accuracy"]


def slice_rows(config, examples: int, workdir: Path) -> list[dict]:
    """The HF Trainer once; ours twice, with a cold and then a warm compilation cache."""
    with config.unlocked():
        config.train.examples = examples
        config.checkpoint_every = 10**9
        config.log_every = 50
        config.compile_cache = str(workdir / "xla_cache")
    tokenizer = load_tokenizer(config)
    split, _ = load_task_splits(config, tokenizer)
    real_tokens = int(split.lengths.sum())
    theirs = trainer_pass(config, split, workdir)
    theirs_acc = dev_accuracy(config, theirs["model_dir"])
    theirs_examples = theirs["steps"] * config.train.batch_size
    theirs_rate = theirs_examples / theirs["wall_s"]
    rows = []
    for cache in ("cold", "warm"):
        ours = train.train(config, workdir / f"jaxcompress_{cache}")
        ours_rate = ours["steps"] * config.train.batch_size / ours["train_seconds_this_run"]
        print(
            f"slice ({cache} cache): ours {ours_rate:.1f} ex/s, HF Trainer {theirs_rate:.1f} ex/s"
        )
        rows.append(
            {
                "name": f"sst2_slice_{examples}_{cache}_compile_cache",
                "comparison": "one pass over a fixed SST-2 train slice: length bucketing vs HF "
                f"Trainer with dynamic padding; ours with a {cache} XLA compilation cache",
                "train_examples": examples,
                "train_subset": f"random subset, subset_seed={config.train.subset_seed}",
                "real_tokens": real_tokens,
                "batch_size": config.train.batch_size,
                "buckets": list(config.buckets),
                "ours_steps": ours["steps"],
                "pytorch_steps": theirs["steps"],
                "ours_wall_s": ours["train_seconds_this_run"],
                "pytorch_wall_s": theirs["wall_s"],
                "ours_examples_per_s": ours_rate,
                "pytorch_examples_per_s": theirs_rate,
                "ours_padded_tokens": ours["padded_tokens_this_run"],
                "pytorch_padded_tokens": theirs["padded_tokens"],
                "ours_padding_ratio": ours["padded_tokens_this_run"] / ours["real_tokens_this_run"],
                "pytorch_padding_ratio": theirs["padded_tokens"] / real_tokens,
                "ours_dev_accuracy": ours["value"],
                "pytorch_dev_accuracy": theirs_acc,
                "metric": "throughput_ratio_vs_pytorch",
                "value": ours_rate / theirs_rate,
                "ratio_vs_pytorch": ours_rate / theirs_rate,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--skip-slice", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_speed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = load_config(str(REPO / "configs/finetune.py:sst2"))
    t0 = time.perf_counter()
    rows = same_shape_rows(config, args.timed_steps)
    if not args.skip_slice:
        with tempfile.TemporaryDirectory() as tmp:
            rows += slice_rows(config, args.examples, Path(tmp))
    write_result(
        args.out,
        "train_speed",
        {
            "model": MODEL,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "rows": rows,
            "wall_s": time.perf_counter() - t0,
        },
    )


if __name__ == "__main__":
    main()
