"""tpu_scripts/tpu.sh: --dry-run prints the exact commands; shellcheck passes; docs are current."""

import os
import re
import shlex
import subprocess

from tests.helpers import REPO

SCRIPT = REPO / "tpu_scripts" / "tpu.sh"
SETTINGS = {"TPU_NAME": "t1", "TPU_ZONE": "z1", "TPU_PROJECT": "p1", "TPU_TYPE": "v4-8"}
# The example in docs/scale.md: a v4-32 slice (4 hosts) writing to a bucket mounted at /mnt/jc.
EXAMPLE_SETTINGS = {
    "TPU_NAME": "jc-v4-32",
    "TPU_ZONE": "us-central2-b",
    "TPU_TYPE": "v4-32",
    "TPU_PROJECT": "my-project",
    "CONFIG": "configs/finetune.py:sst2",
    "BUCKET": "my-bucket",
    "WORKDIR": "/mnt/jc/sst2",
}
EXAMPLE_COMMANDS = ("create", "setup", "mount", "launch", "logs", "fetch", "delete")


def dry_run(*args: str, **settings: str) -> subprocess.CompletedProcess:
    # Only PATH from the caller's environment, so that its TPU_* or JOB cannot leak in.
    env = {"PATH": os.environ["PATH"], **SETTINGS, **settings}
    command = ["bash", str(SCRIPT), "--dry-run", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def remote_line(line: str) -> str:
    """The shell command an `ssh --command=...` line runs on the workers."""
    (flag,) = [word for word in shlex.split(line) if word.startswith("--command=")]
    return flag.removeprefix("--command=")


def remote_command(line: str) -> list[str]:
    """The words of `remote_line`."""
    return shlex.split(remote_line(line))


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
    status = dry_run("status")
    assert status.stdout.split()[4:6] == ["describe", "t1"]


def test_runtime_follows_the_tpu_type():
    create = dry_run("create", TPU_TYPE="v5litepod-16")
    assert "--version=v2-alpha-tpuv5-lite" in create.stdout.split()


def test_setup_installs_on_every_worker():
    lines = dry_run("setup").stdout.strip().splitlines()
    assert len(lines) == 3
    assert all("--worker=all" in line for line in lines)
    assert "scp" in lines[1].split() and "jaxcompress" in lines[1].split()
    assert "pip" in remote_command(lines[2]) and "jax[tpu]" in remote_command(lines[2])


def test_pod_launch_runs_distributed_on_every_worker():
    result = dry_run(
        "launch", TPU_TYPE="v4-32", CONFIG="configs/finetune.py:sst2", WORKDIR="/mnt/jc/run"
    )
    assert result.returncode == 0
    (line,) = result.stdout.strip().splitlines()
    assert "--worker=all" in shlex.split(line)
    words = remote_command(line)
    assert words[words.index("nohup") + 1 :][:8] == [
        ".venv/bin/jaxcompress", "finetune", "--config", "configs/finetune.py:sst2",
        "--workdir", "/mnt/jc/run", "--set", "distributed=True",
    ]  # fmt: skip
    assert words[-6:] == [">", "logs/run.log", "2>&1", "<", "/dev/null", "&"]


def test_single_host_launch_is_not_distributed():
    result = dry_run("launch", TPU_TYPE="v5litepod-8", WORKDIR="runs/local")
    assert result.returncode == 0
    assert "distributed" not in result.stdout
    assert "--workdir runs/local" in result.stdout


def test_tpu_hosts_overrides_the_type():
    result = dry_run("launch", TPU_TYPE="v4-8", TPU_HOSTS="2", WORKDIR="/mnt/jc/run")
    assert "distributed=True" in remote_command(result.stdout)


def test_pod_launch_refuses_a_relative_workdir():
    result = dry_run("launch", TPU_TYPE="v4-32", WORKDIR="runs/tpu")
    assert result.returncode == 2 and not result.stdout
    assert "absolute path on a shared mount, e.g. /mnt/jc/RUN" in result.stderr


def test_launch_refuses_a_bucket_url_on_any_slice():
    """A run directory is appended to and made with local file APIs: a gs:// URL cannot work."""
    for tpu_type in ("v4-8", "v4-32"):
        result = dry_run("launch", TPU_TYPE=tpu_type, WORKDIR="gs://b/jc/run")
        assert result.returncode == 2 and not result.stdout
        assert "gs://" in result.stderr and "mount" in result.stderr
        assert "WORKDIR=/mnt/jc/run" in result.stderr


def test_mount_puts_the_bucket_at_the_same_path_on_every_worker():
    (line,) = dry_run("mount", BUCKET="gs://b/").stdout.splitlines()
    assert "--worker=all" in shlex.split(line)
    command = remote_line(line)
    assert "sudo apt-get install -y -q gcsfuse" in command  # where the image lacks it
    assert command.startswith("(command -v gcsfuse > /dev/null || {")
    assert command.endswith(
        "&& sudo mkdir -p /mnt/jc && sudo chown $USER /mnt/jc"
        " && (mountpoint -q /mnt/jc || gcsfuse --implicit-dirs b /mnt/jc)"
    )
    elsewhere = remote_line(dry_run("mount", BUCKET="b", MOUNT="/data/x y/").stdout)
    assert elsewhere.endswith("gcsfuse --implicit-dirs b '/data/x y')")
    for settings in ({}, {"BUCKET": "b/dir"}, {"BUCKET": "b", "MOUNT": "mnt"}):
        result = dry_run("mount", **settings)
        assert result.returncode == 2 and "usage" in result.stderr and not result.stdout


def test_launch_passes_extra_arguments_and_job():
    extra = ["--set", "mesh.fsdp=-1", "--set", "name=it's x"]
    result = dry_run("launch", *extra, TPU_TYPE="v4-32", WORKDIR="/shared/run")
    words = remote_command(result.stdout)
    assert words[words.index("distributed=True") + 1 :][:4] == extra
    sweep = remote_command(dry_run("launch", "--shard", "0/2", JOB="sweep", CONFIG="s.py").stdout)
    expected = ["sweep", "s.py", "--workdir", "runs/tpu", "--shard", "0/2"]
    assert sweep[sweep.index("sweep") :][:6] == expected
    assert dry_run("launch", JOB="export").returncode == 2


def test_fetch_from_the_mounted_bucket_uses_gcloud_storage():
    fetch = dry_run("fetch", BUCKET="b", WORKDIR="/mnt/jc/jc/run/", FETCH_DIR="out")
    assert fetch.stdout.splitlines() == ["mkdir -p out", "gcloud storage cp -r gs://b/jc/run out"]
    moved = dry_run("fetch", BUCKET="gs://b", MOUNT="/data/", WORKDIR="/data/run").stdout
    assert moved.splitlines()[1] == "gcloud storage cp -r gs://b/run runs"


def test_fetch_elsewhere_copies_from_worker_0():
    for settings in (
        {"WORKDIR": "/shared/run"},  # e.g. NFS
        {"WORKDIR": "/mnt/jc/run"},  # no BUCKET
        {"WORKDIR": "/mnt/jcx/run", "BUCKET": "b"},  # not below MOUNT
    ):
        lines = dry_run("fetch", **settings).stdout.splitlines()
        assert lines[0] == "mkdir -p runs" and "gcloud storage" not in lines[1]
        assert "--worker=0" in lines[1] and f"t1:{settings['WORKDIR']}" in lines[1].split()
    local = dry_run("fetch", WORKDIR="runs/tpu").stdout.splitlines()
    assert "--worker=0" in local[1] and "t1:~/jaxcompress/runs/tpu" in shlex.split(local[1])


def test_logs_follow_worker_0():
    line = dry_run("logs", WORKDIR="/mnt/jc/run/").stdout
    assert "--worker=0" in line
    assert remote_command(line) == ["tail", "-n", "50", "-f", "~/jaxcompress/logs/run.log"]


def test_unknown_command_fails_with_usage():
    for args in (["bogus"], [], ["logs", "extra"]):
        result = dry_run(*args)
        assert result.returncode == 2 and "usage" in result.stderr


def test_dry_run_prints_what_a_real_run_executes(tmp_path):
    """Every printed line, run by a shell, passes gcloud the same words as the script does."""
    fake = '#!/usr/bin/env bash\nprintf "%q " "$@" >> "$CALLS"\necho >> "$CALLS"\n'
    (tmp_path / "gcloud").write_text(fake)
    (tmp_path / "gcloud").chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", **EXAMPLE_SETTINGS}
    for command in ("setup", "mount", "launch", "logs", "delete"):
        args = [command, "--set", "name=it's $x"] if command == "launch" else [command]
        real = {**env, "CALLS": str(tmp_path / f"{command}.real")}
        subprocess.run(["bash", str(SCRIPT), *args], env=real, check=True, cwd=tmp_path)
        dry = ["bash", str(SCRIPT), "--dry-run", *args]
        printed = subprocess.run(dry, env=env, check=True, capture_output=True, text=True).stdout
        replayed = {**env, "CALLS": str(tmp_path / f"{command}.replayed")}
        subprocess.run(["bash", "-c", printed], env=replayed, check=True, cwd=tmp_path)
        calls = (tmp_path / f"{command}.real").read_text()
        assert calls == (tmp_path / f"{command}.replayed").read_text()


def test_shellcheck_passes():
    scripts = sorted(str(path) for path in (REPO / "tpu_scripts").glob("*.sh"))
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def example_block() -> str:
    """docs/scale.md's example: the v4-32 settings, then each command and its dry-run output."""
    settings = " ".join(f"{key}={value}" for key, value in EXAMPLE_SETTINGS.items())
    lines = [f"$ export {settings}"]
    for command in EXAMPLE_COMMANDS:
        lines.append(f"$ bash tpu_scripts/tpu.sh --dry-run {command}")
        lines.extend(dry_run(command, **EXAMPLE_SETTINGS).stdout.splitlines())
    return "\n".join(lines)


def test_docs_show_the_current_dry_run_output():
    docs = (REPO / "docs" / "scale.md").read_text()
    pattern = r"<!-- tpu-dry-run:begin -->\n```\n(.*?)\n```\n<!-- tpu-dry-run:end -->"
    match = re.search(pattern, docs, re.DOTALL)
    assert match, "docs/scale.md lacks the tpu-dry-run block"
    assert match.group(1) == example_block()
