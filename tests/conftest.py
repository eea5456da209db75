"""Shared fixtures: where the offline assets live (set by .ci/run, defaulting to ../shared)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One XLA compilation cache for the session, set before JAX is imported: tests (and the
# subprocesses they start, which inherit the environment) that build the same program
# compile it once. A fresh folder each session, so timings do not depend on earlier runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxcompress-test-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"


# The suite compiles hundreds of small programs and runs each for a few steps, so compile
# time is most of its time: at XLA's backend optimisation level 0 the whole suite took 565 s
# against 653 s at level 1 (and 1 compiled faster than the default 3); the few tests that
# run many steps run slower, and all tests together faster. Subprocesses inherit it. Numbers
# are unchanged within the suite's tolerances, which already allow for other CPUs'
# summation orders.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


def _asset_root(env: str, default: Path) -> Path:
    root = Path(os.environ.get(env, default))
    if not root.exists():
        pytest.fail(f"{env}={root} does not exist; point it at the offline assets")
    return root


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    return _asset_root("JAXCOMPRESS_GLUE_DIR", REPO.parent / "shared" / "data" / "glue")


@pytest.fixture(scope="session")
def model_root() -> Path:
    return _asset_root("JAXCOMPRESS_MODEL_ROOT", REPO.parent / "shared" / "models")


@pytest.fixture(scope="session")
def minilm_dir(model_root: Path) -> Path:
    return model_root / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def teacher_dir(model_root: Path) -> Path:
    return model_root / "minilm-l6-sst2-teacher"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow first (otherwise in file order): with two pytest processes, the
    long ones start early and the short ones fill the end, so both processes finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
