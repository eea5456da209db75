"""The README's results section is generated from benchmarks/results and up to date."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_results_are_generated_from_result_files():
    check = [sys.executable, str(REPO / "benchmarks/tables.py"), "--check", str(REPO / "README.md")]
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
