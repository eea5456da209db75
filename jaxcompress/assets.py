"""Where offline models and GLUE data live (env var or `jaxcompress.toml`), and hub access."""

from __future__ import annotations

import functools
import os
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

from jaxcompress.errors import UserError

CONFIG_FILE = "jaxcompress.toml"
CONFIG_ENV = "JAXCOMPRESS_CONFIG"
MODEL_ROOT_ENV = "JAXCOMPRESS_MODEL_ROOT"
GLUE_DIR_ENV = "JAXCOMPRESS_GLUE_DIR"
# Each key of jaxcompress.toml and the environment variable that overrides it.
KEYS = {"model_root": MODEL_ROOT_ENV, "glue_dir": GLUE_DIR_ENV}
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def find_config_file(start: str | os.PathLike | None = None) -> Path | None:
    """The settings file: `$JAXCOMPRESS_CONFIG`, else `jaxcompress.toml` in `start` (the
    current directory by default) or its nearest parent holding one; None if there is none."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise UserError(f"{CONFIG_ENV}={named}: no such file; point it at a {CONFIG_FILE}")
        return path
    folder = Path(start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / CONFIG_FILE).is_file():
            return candidate / CONFIG_FILE
    return None


@functools.cache
def _read_settings(path: Path, mtime_ns: int) -> dict:
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e}); fix or delete the file") from None
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise UserError(f"{path}: unknown keys {unknown}; known keys: {', '.join(KEYS)}")
    return settings


def settings_file_value(key: str) -> tuple[Path, Path] | None:
    """`(settings file, folder)` for `key` from the settings file, or None if unset there.

    Relative paths are relative to the file's folder; a folder that does not exist raises."""
    file = find_config_file()
    if file is None:
        return None
    value = _read_settings(file.resolve(), file.stat().st_mtime_ns).get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UserError(f"{file}: {key} must be a path string, got {value!r}")
    folder = file.parent / Path(value).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"{file}: {key} = {value!r}: folder {folder} does not exist; fix the path "
            f"(relative paths start at {file.parent}) or remove the key"
        )
    return file, folder


def asset_dir(key: str) -> Path | None:
    """The folder for `key` ("model_root" or "glue_dir"): its environment variable if set,
    else the entry of the settings file; None if neither names one (use the hub)."""
    from_env = os.environ.get(KEYS[key])
    if from_env:
        return Path(from_env).expanduser()
    found = settings_file_value(key)
    return None if found is None else found[1]


def model_root() -> Path | None:
    """The folder of local model directories, or None."""
    return asset_dir("model_root")


def glue_dir() -> Path | None:
    """The folder of local GLUE task folders (SST-2/, CoLA/, ...), or None."""
    return asset_dir("glue_dir")


def how_to_set(key: str) -> str:
    """A hint naming both ways to set `key`, for error messages."""
    return f"set {key} in {CONFIG_FILE} or ${KEYS[key]}"


def hub_endpoint() -> str:
    """The Hugging Face hub URL that downloads go to (HF_ENDPOINT or the library default)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.cache
def endpoint_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP HEAD of `url` gets any answer within `timeout` (cached per process)."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:  # the server answered, with an error status
        return True
    except (OSError, ValueError):  # refused, unresolvable, timed out, or not a URL
        return False


def offline_setting() -> str | None:
    """The set offline variable (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or None."""
    for name in OFFLINE_ENVS:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def require_hub(what: str, key: str) -> None:
    """Raise a UserError at once if `what` (a hub id) cannot be downloaded: offline mode is
    set, or the hub does not answer; the message names `key` as the local alternative."""
    local = f"{how_to_set(key)} to a local copy"
    setting = offline_setting()
    if setting:
        raise UserError(
            f"{what} must come from the Hugging Face hub, but {setting} is set; {local}"
        )
    url = hub_endpoint()
    if not endpoint_reachable(url):
        raise UserError(
            f"{what} must come from the Hugging Face hub, which does not answer at {url} "
            f"(no network?); {local}"
        )
