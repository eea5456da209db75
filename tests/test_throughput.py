"""The throughput benchmark's FLOPs formula, MFU, peaks and row merge (no timing asserted)."""

import importlib
import math
import sys

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import pytest
from flax.traverse_util import flatten_dict

from jaxcompress.compress.distill import objective as objectives
from jaxcompress.models.bert import Bert, init_params
from tests.helpers import REPO, tiny_config

sys.path.insert(0, str(REPO / "benchmarks"))
throughput = importlib.import_module("throughput")

CONFIG = tiny_config(num_labels=3)
B, S = 2, 16


def dot_flops(jaxpr: jex.Jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr, nested jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        assert eqn.primitive.name not in ("scan", "while"), "loops would need their trip count"
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(lhs[d] for d in contract) * math.prod(eqn.outvars[0].aval.shape)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jex.ClosedJaxpr):
                    total += dot_flops(sub.jaxpr)
                elif isinstance(sub, jex.Jaxpr):
                    total += dot_flops(sub)
    return total


def test_matmul_params_match_the_kernels_of_init_params():
    flat = flatten_dict(init_params(CONFIG, jax.random.key(0)), sep="/")
    kernels = {k: v.size for k, v in flat.items() if k.endswith("kernel")}
    encoder = sum(n for k, n in kernels.items() if k.startswith("bert/encoder/"))
    head = sum(n for k, n in kernels.items() if not k.startswith("bert/encoder/"))
    assert set(kernels) - {k for k in kernels if k.startswith("bert/encoder/")} == {
        "bert/pooler/dense/kernel",
        "classifier/kernel",
    }  # embeddings are lookups, not matmuls
    assert throughput.matmul_params(CONFIG) == (encoder, head)


def test_forward_and_train_flops_equal_the_dots_the_model_runs():
    params = init_params(CONFIG, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in throughput.random_batch(B, S, 3).items()}
    loss = objectives.finetune_loss(Bert(CONFIG))
    forward = jax.make_jaxpr(lambda p: Bert(CONFIG).apply({"params": p}, batch["input_ids"]))
    train = jax.make_jaxpr(jax.grad(lambda p: loss(p, batch, None, None)[0]))
    assert dot_flops(forward(params).jaxpr) == throughput.model_flops(CONFIG, B, S, False)
    assert dot_flops(train(params).jaxpr) == throughput.model_flops(CONFIG, B, S, True)


def test_distill_step_is_the_student_step_plus_the_teacher_forward():
    student = throughput.student_of(CONFIG)
    assert (student.num_hidden_layers, student.hidden_size) == (1, CONFIG.hidden_size)
    expected = throughput.model_flops(student, B, S, True)
    expected += throughput.model_flops(CONFIG, B, S, False)
    assert throughput.step_flops(CONFIG, "distill", B, S) == expected
    finetune = throughput.step_flops(CONFIG, "finetune", B, S)
    assert finetune == throughput.model_flops(CONFIG, B, S, True)


def test_bert_base_flops_per_token_follow_the_stated_formula():
    config = throughput.SHAPES["bert-base"]
    n = 12 * (4 * 768 * 768 + 2 * 768 * 3072)  # 84.9M encoder matmul parameters
    per_token = throughput.model_flops(config, 1, 128, True) / 128
    head = 6 * (768 * 768 + 768 * 2) / 128
    assert per_token == 6 * n + 12 * 12 * 128 * 768 + head


def test_mfu_and_peaks():
    assert throughput.mfu(2e12, 0.5, 8e12) == 0.5
    assert throughput.mfu(2e12, 0.5, None) is None
    assert throughput.table_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert throughput.table_peak("NVIDIA H100 80GB HBM3", "float32") == 494.5e12  # TF32
    assert throughput.table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert throughput.table_peak("NVIDIA H200", "bfloat16") == 989e12
    assert throughput.table_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert throughput.table_peak("TPU v5 lite", "bfloat16") == 197e12
    assert throughput.table_peak("TPU v5p", "bfloat16") == 459e12
    assert throughput.table_peak("TPU v4", "float32") == 275e12
    assert throughput.table_peak("Some GPU", "bfloat16") is None


def row(device: str, seq_len: int, value: float, platform: str = "cpu") -> dict:
    return {
        "device": device,
        "platform": platform,
        "shape": "bert-base",
        "mode": "finetune",
        "seq_len": seq_len,
        "dtype": "float32",
        "tokens_per_s": value,
    }


def test_merge_keeps_rows_of_other_devices_and_replaces_remeasured_ones():
    old = {
        "commit": "abc",
        "date": "2026-01-01",
        "machine": {"cpu": "Xeon"},
        "rows": [row("cpu: Xeon", 128, 1.0), row("cpu: Xeon", 512, 2.0)],
    }
    fresh = [row("NVIDIA H200", 128, 100.0, "gpu"), row("cpu: Xeon", 512, 3.0)]
    merged = throughput.merge_rows(old, fresh)
    by_key = {(r["device"], r["seq_len"]): r for r in merged}
    assert set(by_key) == {("cpu: Xeon", 128), ("cpu: Xeon", 512), ("NVIDIA H200", 128)}
    assert by_key["cpu: Xeon", 128]["tokens_per_s"] == 1.0
    assert by_key["cpu: Xeon", 128]["commit"] == "abc"  # carried, tagged with who measured it
    assert by_key["cpu: Xeon", 512] == fresh[1]  # re-measured: this run's row
    assert throughput.merge_rows(None, fresh) == fresh  # sorted by device
    assert "no GPU" in throughput.gpu_note(old["rows"])
    assert "no GPU" not in throughput.gpu_note(merged)


@pytest.mark.slow
def test_steps_of_both_modes_and_pytorch_run_on_a_tiny_shape():
    for mode in throughput.MODES:
        assert throughput.jax_step_seconds(CONFIG, mode, B, S, steps=1, warmup=1) > 0
    assert throughput.torch_step_seconds(CONFIG, B, S, steps=1, warmup=1, device="cpu") > 0
