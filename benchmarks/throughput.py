"""Training throughput and model FLOPs utilisation of BERT shapes, against HF PyTorch, per device.

  python benchmarks/throughput.py            # BERT-base and MiniLM, seq 128 and 512, both modes
  python benchmarks/throughput.py --quick    # smoke run (MiniLM, seq 128, tiny batch); no file

Shapes, random init: bert-base (L12 H768 A12 I3072) and minilm-l6-h384 (L6 H384 A12 I1536), vocab
30522, 2 labels. Each row: a fixed full-length random batch (no padding) on the first device,
median step time over the timed steps after warm-up (compilation excluded, block_until_ready).

Modes:
- finetune: our jitted train step (`make_train_step` with the task loss: forward, backward,
  AdamW with clipping). Same shape, batch and device, in the same run: Hugging Face
  `BertForSequenceClassification` in PyTorch eager (random init, AdamW, clipping, bf16 autocast
  when the dtype is bfloat16; TF32 matmuls on CUDA for float32, like XLA's default), and
  `ratio_vs_pytorch` = our tokens/s / theirs; then the same model under `torch.compile`
  (default mode, the optimizer step eager; `--no-torch-compile` skips it): `pytorch_compile_*`
  columns, its first step (compilation) in `pytorch_compile_first_step_s`, and
  `ratio_vs_pytorch_compile`.
- distill: teacher = the shape, student = the same width with half its layers (bert-base: a
  6-layer 768-wide student); one step is the teacher's forward (no gradient) and the student's
  train step with logit distillation (`objectives.make_loss`, default `Objective`: alpha 0.5,
  KL at temperature 2). No PyTorch comparison.

Model FLOPs count the dense matmuls only (embedding lookups, LayerNorm, softmax, GELU, dropout
and the optimizer are not counted). For B sequences of S tokens, L layers, width H, FFN width I,
C labels:
  N      = L * (4*H*H + 2*H*I)    encoder matmul parameters, applied to every token
  N_head = H*H + H*C              pooler + classifier, applied to the [CLS] token only
  forward FLOPs    = B * (S * (2*N + 4*L*S*H) + 2*N_head)
  train step FLOPs = B * (S * (6*N + 12*L*S*H) + 6*N_head)   (backward = 2 x forward)
4*L*S*H per token is the attention scores Q K^T and context P V (2*S*H multiply-adds each per
token and layer). A distill step = train step (student) + forward (teacher).
MFU = model FLOPs per step / step seconds / peak FLOP/s of one chip. Peak: GPUs and TPUs from a
table by `device_kind` (dense, no sparsity; bfloat16 peak for bfloat16; for float32 the peak of
the precision the matmuls actually run at: TF32 on NVIDIA, one bfloat16 pass on TPU); CPUs have no
standard peak, so the measured rate of a jitted 4096 x 4096 matmul in the compute dtype.

Writes benchmarks/results/throughput.json, keeping the rows of other devices (and of shapes,
modes, lengths and dtypes this run did not measure), tagged with the commit that measured them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import torch
import transformers
from tables import COLUMNS, fmt
from timing import median_seconds, random_batch

from jaxcompress.compress.distill import objective as objectives
from jaxcompress.config import finetune_defaults
from jaxcompress.experiments.results import markdown_table, write_result
from jaxcompress.models.bert import Bert, BertConfig, init_params
from jaxcompress.models.hf import hf_config_dict
from jaxcompress.train import provenance
from jaxcompress.train.step import TrainState, make_optimizer, make_train_step, new_rng

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks/results/throughput.json"

SHAPES = {
    "bert-base": BertConfig(num_labels=2),
    "minilm-l6-h384": BertConfig(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        num_labels=2,
    ),
}
MODES = ("finetune", "distill")
FLOPS_FORMULA = (
    "dense matmuls only; N = L*(4*H*H + 2*H*I) encoder matmul params (every token), "
    "N_head = H*H + H*C pooler + classifier ([CLS] only); forward = B*(S*(2*N + 4*L*S*H) + "
    "2*N_head); train step = B*(S*(6*N + 12*L*S*H) + 6*N_head); distill step = train step of "
    "the student + forward of the teacher; MFU = FLOPs per step / step seconds / peak FLOP/s"
)
# Dense peak FLOP/s of one chip, by `device_kind` substring (first match): (bfloat16, float32 as
# the matmuls run it: TF32 on NVIDIA under XLA's default precision, one bfloat16 pass on TPU).
PEAKS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.5e12),  # SXM
    ("H200", 989e12, 494.5e12),
    ("A100", 312e12, 156e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),  # v5p
)
# Per sequence length: (batch size on CPU, batch size on an accelerator).
BATCH = {128: (8, 128), 512: (2, 32)}
# What a measured row prints: the table's columns, then the torch.compile comparison.
COMPILE_COLUMNS = ("pytorch_compile_tokens_per_s", "ratio_vs_pytorch_compile")
PRINTED = [*COLUMNS["throughput"], *COMPILE_COLUMNS]


def matmul_params(config: BertConfig) -> tuple[int, int]:
    """(encoder matmul parameters, used per token; pooler + classifier, used per sequence)."""
    if not config.is_uniform or config.intermediate_per_layer or config.attention_groups:
        raise ValueError("the FLOPs formula covers uniform BERT shapes only")
    h, i = config.hidden_size, config.intermediate_size
    encoder = config.num_hidden_layers * (4 * h * h + 2 * h * i)
    return encoder, h * h + h * config.num_labels


def model_flops(config: BertConfig, batch_size: int, seq_len: int, train_step: bool) -> float:
    """Matmul FLOPs of a forward pass, or of a train step (forward + backward = 3 x forward)."""
    n, n_head = matmul_params(config)
    attention = 4 * config.num_hidden_layers * seq_len * config.hidden_size
    forward = batch_size * (seq_len * (2 * n + attention) + 2 * n_head)
    return float(3 * forward if train_step else forward)


def step_flops(config: BertConfig, mode: str, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one step of `mode` on shape `config` (distill: student step + teacher)."""
    if mode == "finetune":
        return model_flops(config, batch_size, seq_len, train_step=True)
    student = model_flops(student_of(config), batch_size, seq_len, train_step=True)
    return student + model_flops(config, batch_size, seq_len, train_step=False)


def mfu(flops_per_step: float, step_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s (None without a peak)."""
    return None if not peak_flops else flops_per_step / step_s / peak_flops


def student_of(teacher: BertConfig) -> BertConfig:
    """The distillation student: the teacher's width with half its layers."""
    return teacher.replace(num_hidden_layers=teacher.num_hidden_layers // 2)


def table_peak(device_kind: str, dtype: str) -> float | None:
    """The dense peak FLOP/s of a known accelerator in `dtype`, else None."""
    for name, bf16, f32 in PEAKS:
        if name in device_kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


def measured_matmul_flops(dtype: str, n: int = 4096, steps: int = 5) -> float:
    """FLOP/s of a jitted n x n matmul in `dtype`, median of `steps` after one warm-up."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    dot = jax.jit(jnp.dot)
    seconds = median_seconds(lambda: dot(a, b).block_until_ready(), steps, warmup=1)
    return 2 * n**3 / seconds


def peak_of(device: jax.Device, dtype: str, override_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU on `device`."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.platform == "cpu":
        return measured_matmul_flops(dtype), "measured matmul"
    peak = table_peak(device.device_kind, dtype)
    if peak is None:
        raise SystemExit(f"no peak FLOP/s for {device.device_kind!r}: pass --peak-tflops")
    return peak, "table"


def device_name(device: jax.Device) -> str:
    """What rows are keyed by: the accelerator's kind, or the CPU model and core count."""
    if device.platform == "cpu":
        return f"cpu: {provenance.cpu_model()} ({os.cpu_count()} cores)"
    return device.device_kind


def jax_step_seconds(
    config: BertConfig, mode: str, batch_size: int, seq_len: int, steps: int, warmup: int
) -> float:
    """Median seconds of our jitted step of `mode` on shape `config` (the teacher in distill)."""
    init = jax.jit(init_params, static_argnums=0)
    if mode == "finetune":
        model, teacher, teacher_params = config, None, None
        loss = objectives.finetune_loss(Bert(config))
    else:
        model, teacher, teacher_params = student_of(config), config, init(config, jax.random.key(1))
        loss = objectives.make_loss(Bert(model), objectives.Objective(), Bert(teacher))
    params = init(model, jax.random.key(0))
    tx = make_optimizer(finetune_defaults().train, 10_000)
    state = TrainState(jnp.array(0), params, tx.init(params), new_rng(0))
    step = make_train_step(loss, tx)
    batch = jax.device_put(random_batch(batch_size, seq_len, config.num_labels))

    def run():
        nonlocal state
        state, metrics = step(state, batch, teacher_params)
        jax.block_until_ready((state, metrics))

    return median_seconds(run, steps, warmup)


def torch_device(platform: str) -> str | None:
    """The PyTorch device matching JAX's platform, or None when PyTorch cannot run there."""
    if platform == "cpu":
        return "cpu"
    if platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


def torch_train_step(
    config: BertConfig, batch_size: int, seq_len: int, device: str, compiled: bool = False
) -> Callable[[], None]:
    """One training step of HF BertForSequenceClassification in PyTorch, as a function that
    returns once the step is done: eager, or its forward (and so backward) `torch.compile`d."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**hf_config_dict(config))
    model = transformers.BertForSequenceClassification(hf_config).to(device).train()
    if compiled:
        torch._dynamo.reset()  # every row compiles from scratch, within the recompile limit
    forward = torch.compile(model) if compiled else model
    defaults = finetune_defaults().train
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=defaults.lr,
        weight_decay=defaults.weight_decay,
        fused=device == "cuda",
    )
    batch = {
        k: torch.from_numpy(v).long().to(device)
        for k, v in random_batch(batch_size, seq_len, config.num_labels).items()
        if k != "example_mask"
    }
    bf16 = config.dtype == "bfloat16"

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def torch_step_seconds(
    config: BertConfig, batch_size: int, seq_len: int, steps: int, warmup: int, device: str
) -> float:
    """Median seconds of one PyTorch eager step of HF BertForSequenceClassification."""
    run = torch_train_step(config, batch_size, seq_len, device)
    return median_seconds(run, steps, warmup)


def torch_compile_seconds(
    config: BertConfig, batch_size: int, seq_len: int, steps: int, warmup: int, device: str
) -> tuple[float, float]:
    """(seconds of the first step, compilation mostly; median seconds of the timed steps after
    `warmup` more) of the `torch.compile`d HF model."""
    run = torch_train_step(config, batch_size, seq_len, device, compiled=True)
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    return first, median_seconds(run, steps, max(warmup, 1))


def measure_row(
    shape: str,
    mode: str,
    seq_len: int,
    batch_size: int,
    dtype: str,
    steps: int,
    warmup: int,
    peak: tuple[float, str],
    pytorch_device: str | None,
    torch_compile: bool = False,
    config: BertConfig | None = None,
) -> dict:
    """One result row: our step, its FLOPs and MFU, and (finetune) the PyTorch step, eager and,
    with `torch_compile`, compiled. `config` replaces `SHAPES[shape]` (e.g. a tiny smoke shape)."""
    config = (config or SHAPES[shape]).replace(dtype=dtype)
    seconds = jax_step_seconds(config, mode, batch_size, seq_len, steps, warmup)
    flops = step_flops(config, mode, batch_size, seq_len)
    tokens = batch_size * seq_len
    device = jax.devices()[0]
    row = {
        "name": f"{shape} {mode} s{seq_len}",
        "device": device_name(device),
        "platform": device.platform,
        "shape": shape,
        "mode": mode,
        "dtype": dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "step_ms": seconds * 1e3,
        "tokens_per_s": tokens / seconds,
        "model_flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_tflops": peak[0] / 1e12,
        "peak_source": peak[1],
        "mfu": mfu(flops, seconds, peak[0]),
        "metric": "mfu",
    }
    row["value"] = row["mfu"]
    if mode == "distill":
        row["student_layers"] = student_of(config).num_hidden_layers
        return row
    if pytorch_device is not None:
        theirs = torch_step_seconds(config, batch_size, seq_len, steps, warmup, pytorch_device)
        if pytorch_device == "cuda":
            torch.cuda.empty_cache()  # the model is gone: give its memory back for JAX
        row.update(
            pytorch_step_ms=theirs * 1e3,
            pytorch_tokens_per_s=tokens / theirs,
            pytorch_mfu=mfu(flops, theirs, peak[0]),
            ratio_vs_pytorch=theirs / seconds,
        )
        if torch_compile:
            row.update(compiled_columns(config, batch_size, seq_len, steps, warmup, pytorch_device))
        if "pytorch_compile_step_ms" in row:
            compiled = row["pytorch_compile_step_ms"] / 1e3
            row["pytorch_compile_mfu"] = mfu(flops, compiled, peak[0])
            row["ratio_vs_pytorch_compile"] = compiled / seconds
    return row


def compiled_columns(
    config: BertConfig, batch_size: int, seq_len: int, steps: int, warmup: int, device: str
) -> dict:
    """The `torch.compile` columns of a finetune row; a compiler failure (no C++ compiler,
    an unsupported op) is recorded in `pytorch_compile_error` instead of ending the run."""
    try:
        first, theirs = torch_compile_seconds(config, batch_size, seq_len, steps, warmup, device)
    except Exception as e:  # any compiler failure is a result to report
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"torch.compile failed: {type(e).__name__}: {message}")
        return {"pytorch_compile_error": f"{type(e).__name__}: {message}"}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return {
        "pytorch_compile_step_ms": theirs * 1e3,
        "pytorch_compile_tokens_per_s": batch_size * seq_len / theirs,
        "pytorch_compile_first_step_s": first,
    }


def row_key(row: dict) -> tuple:
    """What a row measures: a later run's row with the same key replaces it."""
    return (row["device"], row["shape"], row["mode"], row["seq_len"], row["dtype"])


def row_order(row: dict) -> tuple:
    """Table order: device, shape, fine-tuning before distillation, length, dtype."""
    return (row["device"], row["shape"], row["mode"] != "finetune", row["seq_len"], row["dtype"])


def merge_rows(
    old: dict | None,
    fresh: list[dict],
    key: Callable[[dict], tuple] = row_key,
    order: Callable[[dict], tuple] = row_order,
) -> list[dict]:
    """This run's rows plus the old result's rows it did not re-measure (other devices among
    them), each carried row tagged with the commit, date and CPU of the run that measured it.
    `key` says what a row measures, `order` sorts the result (other files' rows pass theirs)."""
    kept = []
    if old:
        carried = {"commit": old.get("commit"), "date": old.get("date")}
        carried["cpu"] = old.get("machine", {}).get("cpu")
        measured = {key(r) for r in fresh}
        kept = [{**carried, **r} for r in old["rows"] if key(r) not in measured]
    return sorted(fresh + kept, key=order)


def gpu_note(rows: list[dict]) -> str:
    if any(r["platform"] == "gpu" for r in rows):
        return "GPU rows measured; see each row's device"
    return (
        "no GPU was lent to the runs that wrote this file: no GPU rows yet; run "
        "`python benchmarks/throughput.py` on a GPU to add them (this file's rows are kept)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 512])
    parser.add_argument(
        "--batch", nargs="+", type=int, help="one per --seqs, or one for all (default by device)"
    )
    parser.add_argument("--steps", type=int, help="timed steps (default: CPU 3, else 20)")
    parser.add_argument("--warmup", type=int, help="untimed steps, compilation among them")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default by device")
    parser.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument(
        "--no-torch-compile", action="store_true", help="PyTorch eager only, no torch.compile"
    )
    parser.add_argument("--peak-tflops", type=float, help="peak to divide by instead")
    parser.add_argument("--quick", action="store_true", help="smoke run; writes only with --out")
    parser.add_argument("--out", help=f"result file (default {RESULT.relative_to(REPO)})")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Before JAX starts on a GPU: grow its memory on demand, so that PyTorch fits beside it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    t0 = time.perf_counter()
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    if args.quick:
        args.shapes, args.seqs = ["minilm-l6-h384"], [128]
        args.batch, args.steps, args.warmup = args.batch or [2], args.steps or 2, 1
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    steps = args.steps or (3 if on_cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 3)
    if args.batch and len(args.batch) not in (1, len(args.seqs)):
        raise SystemExit("--batch takes one size, or one per --seqs")
    batches = args.batch or [BATCH[s][0 if on_cpu else 1] for s in args.seqs]
    batches = batches * len(args.seqs) if len(batches) == 1 else batches
    if not on_cpu and dtype == "float32":
        torch.set_float32_matmul_precision("high")  # TF32, as XLA runs float32 matmuls
    pytorch = None if args.no_pytorch else torch_device(device.platform)
    peak = peak_of(device, dtype, args.peak_tflops)
    print(f"{device_name(device)}, {dtype}: peak {peak[0] / 1e12:.2f} TFLOP/s ({peak[1]})")
    fresh = []
    for shape in args.shapes:
        for mode in args.modes:
            for seq_len, batch_size in zip(args.seqs, batches, strict=True):
                row = measure_row(
                    shape,
                    mode,
                    seq_len,
                    batch_size,
                    dtype,
                    steps,
                    warmup,
                    peak,
                    pytorch,
                    torch_compile=not args.no_torch_compile,
                )
                print(json.dumps({k: row[k] for k in PRINTED if k in row}))
                fresh.append(row)
    print(markdown_table(fresh, [c for c in PRINTED if c != "commit"], fmt))
    out = args.out or (None if args.quick else RESULT)
    if out is not None:
        print(f"wrote {write_rows(out, fresh, wall_s=time.perf_counter() - t0)}")


def write_rows(out: str | Path, fresh: list[dict], base: str | Path | None = None, **extra) -> Path:
    """Write `fresh` to the result file `out`, with the rows of `base` (default: `out` itself,
    if it exists) that this run did not re-measure; `extra` goes into the file's body."""
    base = Path(base or out)
    old = json.loads(base.read_text()) if base.exists() else None
    rows = merge_rows(old, fresh)
    body = {
        "flops_formula": FLOPS_FORMULA,
        "peak": "GPU/TPU: dense peak of one chip from a table by device kind (bfloat16; float32 "
        "as the matmuls run it: TF32 on NVIDIA, bfloat16 pass on TPU); CPU: 'measured matmul', "
        "the FLOP/s of a jitted 4096x4096 jnp.dot in the compute dtype, median of 5",
        "distill": "teacher = the shape, student = same width with half the layers; step = "
        "teacher forward + student train step, logit KD (alpha 0.5, KL at T=2) + task loss",
        "pytorch": "finetune rows only: HF BertForSequenceClassification, random init, eager, "
        "AdamW (fused on CUDA) with clipping, bf16 autocast for bfloat16, TF32 on CUDA for "
        "float32; same device, batch and length, in the same run; ratio = ours / theirs",
        "pytorch_compile": "the same model and step with the model wrapped in torch.compile "
        "(default mode; forward and backward compiled, optimizer eager), compiled afresh per "
        "row; first_step_s = its first step, compilation mostly; rows without these columns "
        "were measured before it was added or with --no-torch-compile",
        "gpu": gpu_note(rows),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        **extra,
    }
    return write_result(out, "throughput", body)


if __name__ == "__main__":
    main()
