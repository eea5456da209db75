"""Shared fixtures: where the offline assets live (set by .ci/run, defaulting to ../shared)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
