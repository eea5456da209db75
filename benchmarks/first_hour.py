"""A newcomer's first hour, timed: `make test` (linters and both pytest parts), and the quick
recipe as `make quick` runs it with no terminal attached (total time and the longest silence).

python benchmarks/first_hour.py   # JAXCOMPRESS_MODEL_ROOT / _GLUE_DIR or jaxcompress.toml set

Writes benchmarks/results/first_hour.json. Run it on an otherwise idle machine: the suite's
wall time is the figure README.md and docs/usage.md quote.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxcompress.experiments.results import write_result

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "first_hour.json"
# The whole of `make test` (installs already done: they are no-ops), linters and both pytest
# parts (two processes, then the 8-device tests alone).
MAKE_TEST = ["make", "test"]
# The compile cache off: a newcomer compiles every shape once.
QUICK = ["recipe", "--config", "configs/recipes/sst2.py:distil_l3,quick", "--set", "compile_cache="]
SLOWEST = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$")
SUMMARY = re.compile(r"^=*\s*(\d+ passed.*) in ([\d.]+)s")


def timed_lines(command: list[str]) -> tuple[int, float, list[tuple[float, str]]]:
    """Run `command` in the repo with its output on a pipe (no terminal); returns its exit
    status, wall seconds and each output line with the seconds since the previous one."""
    start = last = time.perf_counter()
    lines = []
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            now = time.perf_counter()
            lines.append((now - last, line.rstrip("\n")))
            last = now
            sys.stdout.write(line)
    return process.returncode, time.perf_counter() - start, lines


def suite() -> dict:
    """`make test`'s wall time, the closing line and wall time of each pytest part, and the
    slowest tests each part lists."""
    status, seconds, lines = timed_lines(MAKE_TEST)
    if status != 0:
        raise SystemExit(f"make test failed (exit {status}); fix it before timing it")
    slowest = [
        {"seconds": float(m[1]), "test": m[3]}
        for m in (SLOWEST.match(text) for _, text in lines)
        if m
    ]
    parts = [
        {"summary": m[1], "wall_s": float(m[2])}
        for m in (SUMMARY.match(text) for _, text in lines)
        if m
    ]
    return {"wall_s": seconds, "parts": parts, "slowest": slowest}


def quick() -> dict:
    """The quick recipe's wall time and the longest gap between two lines of its output."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "jaxcompress.cli", *QUICK, "--workdir", workdir]
        status, seconds, lines = timed_lines(command)
    if status != 0:
        raise SystemExit(f"the quick recipe failed (exit {status})")
    gap, before = max(lines)
    return {"wall_s": seconds, "longest_silence_s": gap, "line_after_it": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    tests, recipe = suite(), quick()
    rows = [
        {"name": "make test", "metric": "wall_s", "value": tests["wall_s"]},
        {"name": "quick recipe, no terminal", "metric": "wall_s", "value": recipe["wall_s"]},
        {
            "name": "quick recipe, no terminal",
            "metric": "longest_silence_s",
            "value": recipe["longest_silence_s"],
        },
    ]
    body = {"rows": rows, "suite": tests, "quick": recipe}
    print(f"wrote {write_result(args.out, 'first_hour', body)}")


if __name__ == "__main__":
    main()
