"""tpu_scripts/tpu.sh --dry-run prints the exact gcloud commands."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tpu_scripts" / "tpu.sh"
ENV = {**os.environ, "TPU_NAME": "t1", "TPU_ZONE": "z1", "TPU_PROJECT": "p1", "TPU_TYPE": "v4-8"}


def dry_run(command: str) -> subprocess.CompletedProcess:
    args = ["bash", str(SCRIPT), "--dry-run", command]
    return subprocess.run(args, env=ENV, capture_output=True, text=True)


def test_create_and_delete_commands():
    create = dry_run("create")
    assert create.returncode == 0
    assert create.stdout.split() == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--accelerator-type=v4-8",
        "--version=tpu-ubuntu2204-base", "--zone=z1", "--project=p1",
    ]  # fmt: skip
    delete = dry_run("delete")
    assert delete.stdout.split() == [
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "t1", "--quiet", "--zone=z1",
        "--project=p1",
    ]  # fmt: skip


def test_setup_installs_on_every_worker():
    lines = dry_run("setup").stdout.strip().splitlines()
    assert len(lines) == 2
    assert all("--worker=all" in line for line in lines)
    assert "pip\\ install" in lines[1]


def test_unknown_command_fails_with_usage():
    result = dry_run("bogus")
    assert result.returncode == 2 and "usage" in result.stderr
