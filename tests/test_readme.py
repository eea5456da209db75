"""The README and docs/: generated tables up to date, README short, links resolve, example runs."""

import os
import re
import subprocess
import sys

from tests.helpers import REPO

README = REPO / "README.md"
# Relative Markdown links and images: [text](target) or ![alt](target), minus any #anchor.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_results_and_summary_are_generated_from_result_files():
    files = [str(REPO / "docs" / "results.md"), str(README)]
    check = [sys.executable, str(REPO / "benchmarks" / "tables.py"), "--check", *files]
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_is_short():
    assert len(README.read_text()) < 15_000


def test_links_in_readme_and_docs_resolve():
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []
    readme_docs = {t.split("#")[0] for t in LINK.findall(README.read_text())}
    assert {f"docs/{name}.md" for name in ("methods", "usage", "results")} <= readme_docs


def test_the_compress_your_own_model_example_runs(tmp_path):
    section = README.read_text().split("## Compress your own model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "kernel sparsity: 0.50"  # exactly half of each kernel: 512 + 320 of 1664
    levels = int(
        re.fullmatch(r"values per channel: at most (\d+) \(4 bits: 15 levels\)", lines[1])[1]
    )
    assert 2 <= levels <= 15
    # hidden 16 x 64 -> 16 x 8 + 8 x 64: 1,738 parameters become 1,738 - 1,024 + 640
    assert lines[2] == "ranks: {'hidden': 8}, parameters: 1738 -> 1354"
    changes = [re.fullmatch(r"(.+): max output change (\d+\.\d+)", line) for line in lines[3:]]
    assert [m[1] for m in changes] == ["pruned", "quantized", "low rank"]
    assert all(0 < float(m[2]) < 10 for m in changes)  # changed, not broken
