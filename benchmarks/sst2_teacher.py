"""Fine-tune the MiniLM teacher on SST-2 with jaxcompress and compare with the reference teacher.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/sst2_teacher.py --workdir runs/teacher_sst2

Writes benchmarks/results/sst2_teacher.json: our dev accuracy (full 872 examples), the
reference (Hugging Face PyTorch) teacher's accuracy under our evaluation code, tokens/s and
wall time. The fine-tuned model is kept in WORKDIR/model as the cached teacher.
"""

import argparse
import logging
import time
from pathlib import Path

from jaxcompress.config import load_config
from jaxcompress.experiments.results import write_result
from jaxcompress.models.hf import load_pretrained
from jaxcompress.train import loop as train
from jaxcompress.train.evaluate import evaluate_model
from jaxcompress.train.inputs import load_eval_splits, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def evaluate_reference(config, model: str) -> float:
    """Dev accuracy of a saved HF model with our data pipeline and Flax model."""
    splits = load_eval_splits(config, load_tokenizer(config))
    return evaluate_model(config, *load_pretrained(model), splits)["validation"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/teacher_sst2")
    parser.add_argument("--config", default=str(REPO / "configs/finetune.py:sst2"))
    parser.add_argument("--reference", default="minilm-l6-sst2-teacher")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/sst2_teacher.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)

    config = load_config(args.config, args.overrides)
    reference = evaluate_reference(config, args.reference)
    t0 = time.perf_counter()
    summary = train.train(config, args.workdir)
    wall = time.perf_counter() - t0
    padded = summary["padded_tokens_this_run"]
    write_result(
        args.out,
        "sst2_teacher",
        {
            "teacher": {
                "model": args.reference,
                "task": "sst2",
                "metric": "accuracy",
                "value": reference,
                "note": "HF PyTorch fine-tune (its SOURCES.md: 0.8899), evaluated by our code",
            },
            "rows": [
                {
                    "name": "jaxcompress_finetune",
                    "task": "sst2",
                    "metric": "accuracy",
                    "value": summary["value"],
                    "seeds": 1,
                    "seed": config.seed,
                    "relative": summary["value"] / reference,
                    "params": summary["params"],
                    "train_examples": summary["train_examples"],
                    "steps": summary["steps"],
                    "epochs": summary["epochs"],
                    "batch_size": config.train.batch_size,
                    "lr": config.train.lr,
                    "wall_s": wall,
                    "train_s": summary["train_seconds_this_run"],
                    "tokens_per_s": summary["tokens_per_s"],
                    "padding_ratio": padded / summary["real_tokens_this_run"],
                    "dev_examples": 872,
                }
            ],
            "config": config.to_dict(),
        },
    )
    print(f"dev accuracy {summary['value']:.4f} (reference {reference:.4f}); wall {wall:.0f}s")
    ratio = padded / summary["real_tokens_this_run"]
    print(f"tokens/s {summary['tokens_per_s']:.0f}, padding ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
