"""Configs: strict keys, typed overrides, quick variants."""

import ml_collections
import pytest

from jaxcompress.config import (
    ConfigValueError,
    apply_overrides,
    compute_dtype,
    config_from_json,
    device_buckets,
    finetune_defaults,
    load_config,
    merge,
    validate,
    with_device_defaults,
)
from tests.helpers import REPO


def test_finetune_config_loads_with_overrides():
    config = load_config(str(REPO / "configs/finetune.py:sst2,quick"), ["train.lr=3e-5", "seed=7"])
    assert config.train.lr == 3e-5 and config.seed == 7
    assert config.train.steps == 300 and config.train.examples == 9600
    assert config.task == "sst2" and config.buckets == finetune_defaults().buckets


def test_unknown_key_in_config_file_fails(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import ml_collections\n"
        "def get_config(arg=''):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.train = ml_collections.ConfigDict({'lrr': 1e-4})\n"
        "    return c\n"
    )
    with pytest.raises(KeyError, match=r"unknown config key 'train\.lrr'; did you mean 'lr'"):
        load_config(str(bad))


def test_unknown_or_mistyped_override_fails():
    config = merge(finetune_defaults(), ml_collections.ConfigDict())
    with pytest.raises(KeyError, match="did you mean 'batch_size'"):
        apply_overrides(config, ["train.batchsize=8"])
    with pytest.raises(KeyError, match="unknown config key 'nope.lr'"):
        apply_overrides(config, ["nope.lr=1"])
    with pytest.raises(TypeError, match="'task' is str"):
        apply_overrides(config, ["task=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(config, ["train.lr"])
    apply_overrides(config, ["train.lr=1", "buckets=[8,16]", "task=cola"])
    assert config.train.lr == 1.0 and config.buckets == (8, 16) and config.task == "cola"


def test_missing_config_file_and_missing_get_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "none.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(AttributeError, match="get_config"):
        load_config(str(empty))


def test_saved_config_round_trips():
    config = load_config(str(REPO / "configs/finetune.py:sst2"), ["buckets=[16,32]"])
    import json

    again = config_from_json(json.loads(json.dumps(config.to_dict(), default=list)))
    assert again.to_dict() == config.to_dict()


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert finetune_defaults().dtype == "auto"
    assert [compute_dtype("auto", b) for b in ("cpu", "gpu", "tpu")] == [
        "float32",
        "bfloat16",
        "bfloat16",
    ]
    assert compute_dtype("float16", "gpu") == "float16"  # an explicit choice is kept
    config = finetune_defaults()
    resolved = with_device_defaults(config)
    assert resolved.dtype == compute_dtype("auto") and config.dtype == "auto"
    with pytest.raises(ConfigValueError, match="dtype"):
        config.dtype = "float8"
        validate(config)


def test_device_buckets_are_a_fine_grid_on_cpu_and_three_on_accelerators():
    cpu = (8, 12, 16, 24, 32, 48, 64, 96, 128)
    assert device_buckets(128, "cpu") == cpu
    assert device_buckets(100, "cpu") == (8, 12, 16, 24, 32, 48, 64, 96, 100)
    assert device_buckets(512, "cpu")[-4:] == (192, 256, 384, 512)
    assert device_buckets(128, "gpu") == device_buckets(128, "tpu") == (32, 64, 128)
    assert device_buckets(512, "gpu") == (128, 256, 512)
    assert device_buckets(16, "gpu") == (8, 16)
    config = finetune_defaults()
    assert config.buckets == () and config.precompile == "auto"
    on_gpu = with_device_defaults(config, "gpu")
    assert on_gpu.buckets == (32, 64, 128) and on_gpu.precompile == "on"
    on_cpu = with_device_defaults(config, "cpu")
    assert on_cpu.buckets == cpu and on_cpu.precompile == "off" and on_cpu.dtype == "float32"
    with config.unlocked():
        config.buckets, config.precompile = (64, 16), "off"
    kept = with_device_defaults(config, "gpu")
    assert kept.buckets == (16, 64) and kept.precompile == "off"  # explicit choices stay


def test_buckets_must_hold_max_length():
    config = finetune_defaults()
    with config.unlocked():
        config.buckets = (32, 64)
    with pytest.raises(ConfigValueError, match=r"buckets=\(32, 64\) has no padded length for "):
        validate(config)
    with config.unlocked():
        config.max_length = 64
    validate(config)


def test_share_section_values_and_its_conflict_with_pruning():
    config = finetune_defaults()
    with config.unlocked():
        config.share.groups = "every:0"
    with pytest.raises(ConfigValueError, match="share.groups"):
        validate(config)
    with config.unlocked():
        config.share.groups, config.share.begin, config.share.end = "every:2", 0.5, 0.2
    with pytest.raises(ConfigValueError, match="share.begin=0.5 is after share.end=0.2"):
        validate(config)
    with config.unlocked():
        config.share.end, config.prune.method = 0.5, "magnitude"
    with pytest.raises(ConfigValueError, match="conflict: pruning masks each layer's copy"):
        validate(config)
    with config.unlocked():
        config.prune.method = ""
    validate(config)
