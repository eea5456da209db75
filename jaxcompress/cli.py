"""The `jaxcompress` command: finetune, recipe, sweep, report, eval, export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from transformers import AutoTokenizer

from jaxcompress import checkpoint, data, recipes, report, sweep, train
from jaxcompress.config import GLUE_DIR_ENV, config_from_json, finetune_defaults, load_config
from jaxcompress.errors import UserError
from jaxcompress.models.bert import Bert
from jaxcompress.models.hf import (
    MODEL_ROOT_ENV,
    load_pretrained,
    resolve_model_dir,
    save_pretrained,
)
from jaxcompress.results import markdown_table

EPILOG = f"""
Offline assets: set {MODEL_ROOT_ENV} to a folder of model directories (hub ids are looked up
there by their last component) and {GLUE_DIR_ENV} to a folder of GLUE TSVs (SST-2/train.tsv,
...). Without them, models and data come from the Hugging Face hub.
"""


def format_value(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def cmd_finetune(args) -> int:
    config = load_config(args.config, args.set)
    summary = train.train(config, args.workdir)
    if "stopped_at" in summary:
        return 0
    rows = [
        {"split": split, "metric": name, "value": value}
        for split, values in summary["eval"].items()
        for name, value in values.items()
    ]
    print(f"\n{config.task}: {summary['steps']} steps on {summary['train_examples']} examples\n")
    print(markdown_table(rows, ["split", "metric", "value"], fmt=format_value))
    print(f"\nmodel: {summary['model_dir']}  summary: {Path(args.workdir) / 'summary.json'}")
    return 0


def cmd_recipe(args) -> int:
    summaries = recipes.run_recipe(recipes.load_recipe(args.config), args.workdir, args.set)
    table = recipes.results_table(summaries)
    (Path(args.workdir) / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nstage outputs and results.md under {args.workdir}")
    return 0


def parse_only(items: list[str]) -> dict[str, list[str]]:
    """`["technique=a,b", "seed=0"]` -> {"technique": ["a", "b"], "seed": ["0"]}."""
    only: dict[str, list[str]] = {}
    for item in items:
        axis, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--only {item!r} must look like AXIS=VALUE[,VALUE...]")
        only.setdefault(axis.strip(), []).extend(v.strip() for v in values.split(","))
    return only


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise SystemExit(f"--shard {text!r} must look like INDEX/COUNT, e.g. 0/2")
    return int(index), int(count)


def cmd_sweep(args) -> int:
    config = sweep.load_sweep(args.config)
    only, shard = parse_only(args.only), parse_shard(args.shard)
    summaries = sweep.run_sweep(config, args.workdir, only, shard, args.set)
    total = len(sweep.expand(config, only, args.set)[shard[0] :: shard[1]])
    print(f"\n{len(summaries)} of {total} runs finished under {args.workdir}")
    if len(summaries) == total and shard[1] == 1:
        # Only this sweep's runs: other sweeps may share the workdir (and its stages).
        base = sweep.base_key(config, args.set)
        out = Path(args.workdir) / f"report_{base}"
        written = report.write_report([args.workdir], out, plots=False, base=base)
        print("\n" + written["table"])
    return 0


def cmd_report(args) -> int:
    out = args.out or str(Path(args.dirs[0]) / "report")
    written = report.write_report(args.dirs, out, args.allow_mixed, plots=not args.no_plots)
    print(written["table"])
    print("\nwrote " + ", ".join(str(p) for p in written["written"]))
    return 0


def cmd_eval(args) -> int:
    config, params = load_pretrained(args.model)
    outputs = train.get_num_outputs(args.task)
    if config.num_labels != outputs:
        raise SystemExit(
            f"{args.model} has {config.num_labels} outputs; {args.task} needs {outputs}"
        )
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.tokenizer or args.model))
    glue = args.glue_dir or os.environ.get(GLUE_DIR_ENV) or None
    step = train.make_eval_step(Bert(config))
    buckets = finetune_defaults().buckets
    results = {}
    for split_name in data.get_task(args.task).eval_splits:
        ds = data.load_split(args.task, split_name, glue)
        split = data.tokenize_split(ds, args.task, tokenizer, args.max_length)
        results[split_name] = train.evaluate(
            step, params, split, args.task, args.batch_size, buckets
        )
    print(json.dumps(results, indent=2))
    return 0


def cmd_export(args) -> int:
    run = Path(args.workdir)
    if not (run / "config.json").exists():
        raise SystemExit(f"{run} is not a run directory (no config.json)")
    config = config_from_json(json.loads((run / "config.json").read_text()))
    teacher, _ = train.load_teacher(config)  # its width decides the checkpoint's projections
    bert_config, _, _, state, pruning = train.initial_state(
        config, total_steps=1, teacher_config=None if teacher is None else teacher.config
    )
    restored = checkpoint.restore_latest(checkpoint.manager(run / "checkpoints"), state)
    if restored is None:
        raise SystemExit(f"no checkpoint in {run / 'checkpoints'}")
    tokenizer_dir = resolve_model_dir(config.tokenizer or config.model)
    params = train.pruned_params(restored, pruning)
    out = save_pretrained(bert_config, params, args.out, tokenizer_dir=tokenizer_dir)
    print(f"exported step {int(restored.step)} of {run} to {out}")
    return 0


def add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcompress",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"show tracebacks (or set {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="fine-tune a model on a GLUE task (resumes a workdir)")
    p.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    p.add_argument("--workdir", required=True)
    add_overrides(p, "override a config key, e.g. --set train.lr=1e-4")
    p.set_defaults(fn=cmd_finetune)
    p = sub.add_parser("recipe", help="run a compression recipe's stages (resumes a workdir)")
    p.add_argument("--config", required=True, help="path/to/recipe.py[:arg]")
    p.add_argument("--workdir", required=True)
    add_overrides(p, "override a key of every finetune stage, e.g. --set train.steps=50")
    p.set_defaults(fn=cmd_recipe)
    p = sub.add_parser("sweep", help="run a sweep of variants x seeds (resumes a workdir)")
    p.add_argument("config", help="path/to/sweep.py[:arg], e.g. configs/ablations/sst2_main.py")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="AXIS=V[,V]",
        help="run only these technique / strength / seed values (repeatable)",
    )
    p.add_argument("--shard", default="0/1", help="INDEX/COUNT: this process's share of runs")
    add_overrides(p, "override a key of every finetune stage, e.g. --set train.steps=50")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("report", help="aggregate sweep runs: Table-1 markdown, CSV, plots")
    p.add_argument("dirs", nargs="+", help="sweep workdirs (or their runs/ folders)")
    p.add_argument("--out", default="", help="output prefix (default: DIR/report)")
    p.add_argument("--allow-mixed", action="store_true", help="accept different base configs")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("eval", help="evaluate a saved model on a GLUE task's dev split(s)")
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--task", required=True)
    p.add_argument("--tokenizer", default="")
    p.add_argument("--glue-dir", default="")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="write a run's latest checkpoint as a Hugging Face model")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_export)
    return parser


DEBUG_ENV = "JAXCOMPRESS_DEBUG"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.fn(args)
    except UserError as e:
        if debug:
            raise
        print(f"jaxcompress {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            f"jaxcompress {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
