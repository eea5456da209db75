"""The `jaxcompress` command: finetune, recipe, sweep, report, eval, export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from jaxcompress import assets
from jaxcompress.config import config_from_json, load_config
from jaxcompress.data import glue as data
from jaxcompress.errors import UserError
from jaxcompress.experiments import recipes, report, sweep
from jaxcompress.experiments.results import markdown_table
from jaxcompress.models.hf import resolve_model_dir, save_pretrained
from jaxcompress.train import checkpoint
from jaxcompress.train import loop as train
from jaxcompress.train.evaluate import evaluate_saved
from jaxcompress.train.inputs import load_teacher
from jaxcompress.train.progress import duration

EPILOG = f"""
Offline assets: `model_root` is a folder of model directories (hub ids are looked up there by
their last component), `glue_dir` a folder of GLUE TSVs (SST-2/train.tsv, ...). Set them in a
{assets.CONFIG_FILE} (`model_root = "path"`, `glue_dir = "path"`, relative to the file) in the
current directory or a parent (or the file ${assets.CONFIG_ENV} names; `make install` writes
one), or with ${assets.MODEL_ROOT_ENV} and ${assets.GLUE_DIR_ENV}, which win. Without them,
models and data come from the Hugging Face hub.
"""


def check_workdir(workdir: str) -> None:
    """Create `workdir` and write a scratch file there: a workdir that cannot be written is
    reported before any data or model loads."""
    path = Path(workdir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path, prefix=".jaxcompress-write-check-").close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(
            f"workdir {path} is not writable ({reason}); pass a --workdir you can write to"
        ) from None


def format_value(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def cmd_finetune(args) -> int:
    config = load_config(args.config, args.set)
    data.get_task(config.task)  # an unknown task fails before the workdir is made
    check_workdir(args.workdir)
    started = time.perf_counter()
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
    print(f"total time: {duration(time.perf_counter() - started)}")
    return 0


def cmd_recipe(args) -> int:
    recipe = recipes.load_recipe(args.config)
    check_workdir(args.workdir)
    summaries = recipes.run_recipe(recipe, args.workdir, args.set)
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
            raise UserError(f"--only {item!r} must look like AXIS=VALUE[,VALUE...]")
        only.setdefault(axis.strip(), []).extend(v.strip() for v in values.split(","))
    return only


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise UserError(f"--shard {text!r} must look like INDEX/COUNT, e.g. 0/2")
    return int(index), int(count)


def cmd_sweep(args) -> int:
    config = sweep.load_sweep(args.config)
    only, shard = parse_only(args.only), parse_shard(args.shard)
    check_workdir(args.workdir)
    started = time.perf_counter()
    summaries = sweep.run_sweep(config, args.workdir, only, shard, args.set)
    total = len(sweep.expand(config, only, args.set)[shard[0] :: shard[1]])
    print(f"\n{len(summaries)} of {total} runs finished under {args.workdir}")
    if len(summaries) == total and shard[1] == 1:
        # Only this sweep's runs: other sweeps may share the workdir (and its stages).
        base = sweep.base_key(config, args.set)
        out = Path(args.workdir) / f"report_{base}"
        written = report.write_report([args.workdir], out, plots=False, base=base)
        print("\n" + written["table"])
    print(f"\ntotal time: {duration(time.perf_counter() - started)}")
    return 0


def cmd_report(args) -> int:
    out = args.out or str(Path(args.dirs[0]) / "report")
    written = report.write_report(args.dirs, out, args.allow_mixed, plots=not args.no_plots)
    print(written["table"])
    print("\nwrote " + ", ".join(str(p) for p in written["written"]))
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse reports anything else, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def cmd_eval(args) -> int:
    results = evaluate_saved(
        args.model,
        args.task,
        args.split,
        glue_dir=args.glue_dir,
        tokenizer=args.tokenizer,
        max_length=args.max_length,
        batch_size=args.batch_size,
        examples=args.examples,
    )
    print(json.dumps(results, indent=2))
    return 0


def checkpoint_steps(run: Path) -> list[Path]:
    """The entries of a run's checkpoints/ folder (none if it has none)."""
    folder = run / "checkpoints"
    return list(folder.iterdir()) if folder.is_dir() else []


def run_config(run: Path):
    """The saved config of a fine-tuning run directory; UserError for any other folder."""
    usage = "export takes the --workdir of a finetune run (or of a recipe's finetune stage)"
    if not run.is_dir():
        raise UserError(f"{run} does not exist; {usage}")
    file = run / "config.json"
    if not file.is_file():
        stages = sorted(p.name for p in run.iterdir() if (p / "config.json").is_file())
        hint = f"; its runs: {', '.join(stages)}" if stages else ""
        raise UserError(f"{run} is not a run directory (no config.json); {usage}{hint}")
    try:
        saved = json.loads(file.read_text())
    except ValueError as e:
        raise UserError(f"{file} is not valid JSON ({e}); {usage}") from None
    if isinstance(saved, dict) and ("model_type" in saved or "architectures" in saved):
        raise UserError(
            f"{run} is a model directory (Hugging Face config.json), not a run; {usage}"
        )
    try:
        return config_from_json(saved)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{file} is not a jaxcompress run config ({e}); {usage}") from None


def cmd_export(args) -> int:
    run = Path(args.workdir)
    config = run_config(run)
    if not any(p.name.isdigit() for p in checkpoint_steps(run)):
        raise UserError(
            f"run {run} has no checkpoint in {run / 'checkpoints'}; rerun its finetune "
            "command (it saves every checkpoint_every steps and at the end), then export"
        )
    teacher, _ = load_teacher(config)  # its width decides the checkpoint's projections
    bert_config, _, _, state, _ = train.initial_state(
        config, total_steps=1, teacher_config=None if teacher is None else teacher.config
    )
    restored = checkpoint.restore_latest(checkpoint.manager(run / "checkpoints"), state)
    if restored is None:
        raise UserError(f"run {run} has no readable checkpoint in {run / 'checkpoints'}")
    tokenizer_dir = resolve_model_dir(config.tokenizer or config.model)
    params = train.exported_params(restored)
    labels = data.get_task(config.task).label_names
    out = save_pretrained(
        bert_config, params, args.out, tokenizer_dir=tokenizer_dir, label_names=labels
    )
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
    p.add_argument(
        "config", help="path/to/sweep.py[:arg], e.g. configs/ablations/sst2.py:main (see there)"
    )
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
    p = sub.add_parser(
        "eval", help="evaluate a saved model on a GLUE task's dev split(s) or train split"
    )
    p.add_argument(
        "--model",
        required=True,
        help="a Hugging Face model directory (e.g. a run's model/), a jaxcompress one (a "
        "transform stage's compressed/), a name looked up in model_root (e.g. "
        "minilm-l6-sst2-teacher), or a hub id",
    )
    p.add_argument("--task", required=True, help=f"GLUE task, one of: {', '.join(data.TASKS)}")
    p.add_argument(
        "--tokenizer", default="", help="tokenizer directory or hub id (default: the model's)"
    )
    p.add_argument(
        "--glue-dir",
        default="",
        help="folder of GLUE TSVs (default: glue_dir of jaxcompress.toml or "
        f"${assets.GLUE_DIR_ENV}, else the hub)",
    )
    p.add_argument(
        "--max-length", type=_positive_int, default=128, help="truncate inputs to this many tokens"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="examples per eval batch")
    p.add_argument(
        "--split",
        action="append",
        default=[],
        help="a split to evaluate, e.g. train (how well a model fits what it trained on); "
        "repeatable (default: the task's dev splits)",
    )
    p.add_argument(
        "--examples",
        type=_positive_int,
        default=0,
        help="evaluate at most this many examples (the first) of each split, as a run's "
        "eval.examples does (default: all)",
    )
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="write a run's latest checkpoint as a Hugging Face model")
    p.add_argument("--workdir", required=True, help="a finetune run directory")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    p.set_defaults(fn=cmd_export)
    return parser


DEBUG_ENV = "JAXCOMPRESS_DEBUG"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    # "Unable to initialize backend 'tpu'" (INFO) on every machine without one.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.fn(args)
    except UserError as e:
        if debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"jaxcompress {args.command}: error: {message}", file=sys.stderr)
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
