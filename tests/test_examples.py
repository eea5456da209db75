"""The scripts in examples/ run and show what they claim."""

import importlib.util

import pytest

from tests.helpers import REPO


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compress_cnn_shrinks_bytes_and_flops_and_keeps_learning(capsys):
    result = load_example("compress_cnn").main(["--steps", "150"])
    assert "accuracy" in capsys.readouterr().out
    (float_acc, compressed_acc), (float_bytes, packed_bytes) = result["accuracy"], result["bytes"]
    assert float_acc > 0.5 and compressed_acc > 0.5  # four classes: chance is 0.25
    assert packed_bytes < float_bytes / 20  # rank 16 of 2048 x 256, and 4-bit codes
    flops_before, flops_after = result["flops"]
    assert flops_after < 0.5 * flops_before  # the factors run as two matmuls
    assert result["ranks"] == {"Dense_0": 16}
    assert 0.5 <= result["kernel_sparsity"] < 0.52  # half of every kernel, rounded per layer
