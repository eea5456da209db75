"""Run a compression recipe and keep its evaluation as a result file.

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \
    python benchmarks/recipe.py configs/recipes/sst2.py:tinybert --workdir runs/tinybert

Writes benchmarks/results/recipe_<name>.json: every evaluated model of the recipe's
`evaluate` stages, plus each training stage's steps.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from jaxcompress.experiments import recipes
from jaxcompress.experiments.results import write_result

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="path/to/recipe.py[:arg]")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    summaries = recipes.run_recipe(recipes.load_recipe(args.recipe), args.workdir)
    stages = [
        {"stage": s["stage"], "steps": s["steps"], "train_examples": s["train_examples"]}
        for s in summaries
        if s["kind"] == "finetune"
    ]
    rows = [
        {
            "name": f"{s['stage']}:{row['model']}",
            "task": "sst2",
            **{k: v for k, v in row.items() if k not in ("eval", "model", "latency_s")},
            "latency_ratio": {"cpu": row.get("speedup"), "gpu": None},
        }
        for s in summaries
        if s["kind"] == "evaluate"
        for row in s["rows"]
    ]
    name = args.recipe.split(":")[-1].split(",")[0]
    write_result(
        REPO / f"benchmarks/results/recipe_{name}.json",
        f"recipe_{name}",
        {"recipe": args.recipe, "stages": stages, "rows": rows, "wall_s": time.perf_counter() - t0},
    )
    print(recipes.results_table(summaries))


if __name__ == "__main__":
    main()
