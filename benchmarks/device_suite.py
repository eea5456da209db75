"""Issue #17's measurements in one run on one accelerator: throughput and MFU beside PyTorch eager
and torch.compile, paired latency of every compressed family's SST-2 shape, one SST-2 epoch.

On the GPU machine (one H200; about 8 minutes; $OUT is the folder whose files come back):

  source .device/env.sh; python3 benchmarks/device_suite.py --out-dir $OUT

Before that, here: `bash ../shared/device/prep.sh all-MiniLM-L6-v2` (the epoch fine-tunes
that model, the only one that travels; float16 weights, read as float32), then carry
`.device`. Check everything first on this CPU with tiny shapes (a few minutes):

  JAXCOMPRESS_MODEL_ROOT=../shared/models JAXCOMPRESS_GLUE_DIR=../shared/data/glue \\
    nice -n 5 python benchmarks/device_suite.py --quick --out-dir /tmp/suite_quick

Sections, most important first; each row is printed as it is measured and its file rewritten
at once, so an interrupted run keeps what it measured:
1. peaks: the datasheet peak of the device (`throughput.PEAKS`) and the measured rate of a
   jitted N x N matmul in the compute dtype (N = 8192 on an accelerator).
2. throughput, fine-tuning at sequence 128 (BERT-base, then MiniLM-L6-H384; random init):
   `throughput.measure_row` (our jitted step, HF PyTorch eager, HF PyTorch under
   torch.compile), MFU against the datasheet peak (`mfu`, `pytorch_mfu`,
   `pytorch_compile_mfu`) and against the measured matmul (`*_vs_measured`).
3. latency: the teacher's shape (MiniLM-L6-H384, 2 labels) against each compressed family's
   SST-2 shape, forward passes interleaved (`dynamic.paired_speedup`: per-round ratios,
   alternating which runs first), at batch 1 and 128 x 128 tokens; random weights of the
   right shapes (the rows say so): layers dropped, heads pruned, FFN pruned, all three,
   low-rank FFN, factorized embeddings (E=128), int8 and FP8 (e4m3) execution
   (`IntegerModel`), PoWER-BERT; then BERT-base's int8 and FP8 execution against its own
   forward (the issue's int8 target is on BERT-base).
   Early exit is left out (how deep each example runs depends on real data;
   benchmarks/dynamic.py measures it).
4. epoch: one SST-2 fine-tune epoch of configs/finetune.py:sst2 through the real trainer
   (`train.loop.train`, cold compilation cache): compile seconds, seconds to step 50, wall
   time and dev accuracy.
5. throughput, the rest: fine-tuning at sequence 512, then distillation at 128 and 512.
`--budget-s` (default 450) bounds the run: a row or section whose rough cost (`COST`) no
longer fits is skipped with a printed note. `--sections` runs a subset. Rows of earlier calls
are kept (merged from the --out-dir's files if it has them, else from benchmarks/results);
with `--resume` rows this device already has there are not measured again: copy a first
call's files into benchmarks/results (they travel with the checkout) and a second call goes
on where the budget stopped the first. `--dtype` overrides the compute dtype (bfloat16 on an
accelerator, float32 on CPU by default).

Files in --out-dir (default benchmarks/results; with --quick a fresh temporary folder unless
--out-dir is given): throughput.json (rows merged per device with the committed file, as
`throughput.py` does), device_latency.json, sst2_epoch.json and device_suite.json (what ran,
what was skipped, and why). Model names resolve under $JAXCOMPRESS_MODEL_ROOT; a missing model
or GLUE folder ends the run before it measures anything, with one line saying what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import throughput
from dynamic import paired_speedup
from flax.traverse_util import flatten_dict

from jaxcompress import assets
from jaxcompress.compress import transforms
from jaxcompress.compress.quant import int8 as int8_exec
from jaxcompress.compress.quant.activations import calibrate
from jaxcompress.compress.quant.quantizers import QuantSpec, quantize
from jaxcompress.config import load_config, with_device_defaults
from jaxcompress.experiments.latency import jitted_forward
from jaxcompress.experiments.results import write_result
from jaxcompress.models.bert import Bert, BertConfig, Linear, init_params
from jaxcompress.train import loop, run_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results"
SECTIONS = ("throughput", "latency", "epoch")
EPOCH_CONFIG = f"{REPO}/configs/finetune.py:sst2"
# The SST-2 teacher's shape (minilm-l6-sst2-teacher), whose compressed families are timed.
TEACHER = throughput.SHAPES["minilm-l6-h384"]
# --quick: tiny stand-ins, so that every code path runs on a CPU in a few minutes.
QUICK_SHAPES = {
    "tiny-l2-h64": BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    ).replace(num_labels=2)
}
QUICK_TEACHER = BertConfig(
    hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256, num_labels=2
)
QUICK_EPOCH = [
    "train.examples=64",
    "train.steps=4",
    "train.batch_size=16",
    "max_length=32",
    "buckets=[32]",
    "eval.examples=64",
]
# Rough seconds per item, (accelerator, CPU, CPU --quick): what `Budget` checks before it
# starts one. Accelerator figures are estimates for one H200 from shared/device/README.md (a
# BERT train step compiles in tens of seconds, torch.compile about as long again; the epoch
# compiles for about 128 s and trains for 46 s); on a GPU the order of the sections runs the
# s128 throughput rows, the latency rows and the epoch within the default budget.
COST = {
    "finetune bert-base": (90, 900, 60),
    "finetune minilm-l6-h384": (60, 300, 60),
    "finetune tiny-l2-h64": (60, 60, 60),
    "distill bert-base": (45, 300, 10),
    "distill minilm-l6-h384": (30, 100, 10),
    "distill tiny-l2-h64": (10, 10, 10),
    "latency family": (6, 60, 4),
    "epoch": (190, 3600, 40),
}


@dataclasses.dataclass
class Budget:
    """Seconds this run may take; `fits` says whether an item still does, and notes a skip."""

    seconds: float
    cost_column: int
    start: float = dataclasses.field(default_factory=time.perf_counter)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, item: str, what: str) -> bool:
        cost = COST[item][self.cost_column]
        left = self.seconds - self.elapsed()
        if cost <= left:
            return True
        note = f"skipped {what}: about {cost} s needed, {max(left, 0):.0f} s of the budget left"
        print(f"[{self.elapsed():5.0f} s] {note}")
        self.skipped.append(note)
        return False


@dataclasses.dataclass
class Suite:
    """The run's settings, what it measured so far, and the result files it rewrites."""

    out_dir: Path
    quick: bool
    budget: Budget
    device: jax.Device
    dtype: str
    tmp: Path
    peak: tuple[float, str] = (0.0, "")
    measured_peak: float = 0.0
    datasheet_peak: float | None = None
    rows: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    bases: dict[str, Path | None] = dataclasses.field(default_factory=dict)
    resume: bool = False
    measured: dict[str, set[tuple]] = dataclasses.field(default_factory=dict)

    @property
    def accelerator(self) -> bool:
        return self.device.platform != "cpu"

    @property
    def device_name(self) -> str:
        return throughput.device_name(self.device)

    def say(self, text: str) -> None:
        print(f"[{self.budget.elapsed():5.0f} s] {text}", flush=True)

    def note(self, text: str) -> None:
        self.say(text)
        self.notes.append(text)

    def guarded(self, what: str, measure: Callable[[], None]) -> None:
        """Run `measure`; a failure is printed (with its traceback) and recorded, and the run
        goes on to the next item: one broken row must not cost the rest of the machine time."""
        try:
            measure()
        except Exception as e:  # reported in device_suite.json and the exit status
            traceback.print_exc()
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.failed.append(f"{what}: {type(e).__name__}: {message}")
            self.say(f"FAILED {self.failed[-1]}")

    def base(self, name: str) -> Path | None:
        """The file whose rows a result file keeps: the out-dir's own if it had one when the
        run began (an earlier call of this suite), else the committed one."""
        if name not in self.bases:
            for candidate in (self.out_dir / name, RESULTS / name):
                if candidate.exists():
                    self.bases[name] = candidate
                    break
            else:
                self.bases[name] = None
        return self.bases[name]

    def done(self, name: str, keys: list[tuple], what: str) -> bool:
        """With --resume: whether result file `name`'s base already has rows of this device
        (and of this mode, quick or not) under all `keys`; they are kept, not measured again."""
        base = self.base(name)
        if not self.resume or base is None:
            return False
        if name not in self.measured:
            key = throughput.row_key if name == "throughput.json" else RESULT_FILES[name][0]
            self.measured[name] = {
                key(r)
                for r in json.loads(base.read_text())["rows"]
                if r.get("device") == self.device_name and bool(r.get("quick")) == self.quick
            }
        if all(k in self.measured[name] for k in keys):
            self.say(f"kept from {base}: {what}")
            return True
        return False

    def add(self, name: str, row: dict, shown: tuple[str, ...]) -> None:
        """Print `row` (the `shown` columns) and rewrite result file `name` with it."""
        row = {**row, "quick": True} if self.quick else row
        self.rows.setdefault(name, []).append(row)
        self.say(f"{name}: " + json.dumps({k: short(row[k]) for k in shown if k in row}))
        self.write(name)

    def write(self, name: str) -> None:
        fresh = self.rows.get(name, [])
        path = self.out_dir / name
        wall = {"wall_s": self.budget.elapsed()}
        if name == "throughput.json":
            throughput.write_rows(path, fresh, self.base(name), **wall, **self.peak_fields())
            return
        key, order, benchmark, about = RESULT_FILES[name]
        if name == "device_suite.json":
            about = self.summary()
        base = self.base(name)
        old = json.loads(base.read_text()) if base else None
        rows = throughput.merge_rows(old, fresh, key=key, order=order)
        write_result(path, benchmark, {**about, "rows": rows, **wall})

    def summary(self) -> dict:
        """The run's own record: budget, what was skipped and why, notes, peaks."""
        return {
            "budget_s": self.budget.seconds,
            "skipped": self.budget.skipped,
            "notes": self.notes,
            "failed": self.failed,
            **self.peak_fields(),
        }

    def peak_fields(self) -> dict:
        return {
            "suite_peaks": {
                "device": self.device_name,
                "dtype": self.dtype,
                "datasheet_tflops": None if not self.datasheet_peak else self.datasheet_peak / 1e12,
                "measured_matmul_tflops": self.measured_peak / 1e12,
            }
        }


def short(value: object) -> object:
    """Four significant digits for printing."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def platform_key(device: jax.Device) -> str:
    return "cpu" if device.platform == "cpu" else "gpu" if device.platform == "gpu" else "tpu"


# ---------------------------------------------------------------------------------------------
# 1. Peaks


def measure_peaks(suite: Suite) -> None:
    n = 8192 if suite.accelerator else (1024 if suite.quick else 4096)
    suite.measured_peak = throughput.measured_matmul_flops(suite.dtype, n=n, steps=10)
    suite.datasheet_peak = throughput.table_peak(suite.device.device_kind, suite.dtype)
    if suite.datasheet_peak:
        suite.peak = (suite.datasheet_peak, "table")
    else:
        suite.peak = (suite.measured_peak, "measured matmul")
    datasheet = f"{suite.datasheet_peak / 1e12:.0f}" if suite.datasheet_peak else "none"
    suite.note(
        f"peaks, {suite.dtype}: datasheet {datasheet} TFLOP/s; measured {n}^3 matmul "
        f"{suite.measured_peak / 1e12:.2f} TFLOP/s; MFU is of the {suite.peak[1]} peak"
    )


# ---------------------------------------------------------------------------------------------
# 2 and 5. Throughput

THROUGHPUT_SHOWN = (
    "name",
    "batch_size",
    "step_ms",
    "mfu",
    "mfu_vs_measured",
    "pytorch_step_ms",
    "pytorch_compile_step_ms",
    "pytorch_compile_first_step_s",
    "ratio_vs_pytorch",
    "ratio_vs_pytorch_compile",
    "pytorch_compile_error",
)


def throughput_items(quick: bool) -> list[tuple[str, str, int]]:
    """(shape, mode, sequence length) of every throughput row, most important first."""
    shapes = list(QUICK_SHAPES) if quick else ["bert-base", "minilm-l6-h384"]
    seqs = [32] if quick else [128, 512]
    items = [(s, mode, n) for mode in throughput.MODES for n in seqs for s in shapes]
    return sorted(items, key=lambda item: item != (item[0], "finetune", seqs[0]))


def throughput_row(suite: Suite, shape: str, mode: str, seq_len: int) -> None:
    what = f"throughput {shape} {mode} s{seq_len}"
    key = (suite.device_name, shape, mode, seq_len, suite.dtype)
    if suite.done("throughput.json", [key], what):
        return
    if not suite.budget.fits(f"{mode} {shape}", what):
        return
    on_cpu = not suite.accelerator
    batch = 2 if suite.quick else throughput.BATCH[seq_len][1 if suite.accelerator else 0]
    steps, warmup = (2, 1) if suite.quick else ((3, 1) if on_cpu else (20, 3))
    row = throughput.measure_row(
        shape,
        mode,
        seq_len,
        batch,
        suite.dtype,
        steps,
        warmup,
        suite.peak,
        throughput.torch_device(suite.device.platform),
        torch_compile=True,
        config=QUICK_SHAPES.get(shape),
    )
    row["measured_peak_tflops"] = suite.measured_peak / 1e12
    for column in ("", "pytorch_", "pytorch_compile_"):
        step_ms = row.get(f"{column}step_ms")
        if step_ms:
            achieved = row["model_flops_per_step"] / (step_ms / 1e3)
            row[f"{column}mfu_vs_measured"] = achieved / suite.measured_peak
    suite.add("throughput.json", row, THROUGHPUT_SHOWN)


# ---------------------------------------------------------------------------------------------
# 3. Latency

LATENCY_SHOWN = ("name", "dtype", "latency_s", "teacher_latency_s", "value")
RANDOM_WEIGHTS = "random init of the compressed shape: latency only, no accuracy"


def encoder_kernels(params: dict) -> dict[str, jax.Array]:
    """Every encoder Dense kernel (2-D) of `params`, by parameter path."""
    return {
        path: value
        for path, value in flatten_dict(params, sep="/").items()
        if path.startswith("bert/encoder/") and path.endswith("kernel") and value.ndim == 2
    }


def int8_model(config: BertConfig, params: dict) -> tuple[int8_exec.IntegerModel, int]:
    """The teacher run with every encoder Dense kernel as int8 (symmetric, per channel, as the
    W8 artefact of benchmarks/quantize.py), activations quantized per tensor at run time."""
    spec = QuantSpec(bits=8)
    weights = {
        path: int8_exec.int8_weight(quantize(value, spec), spec)
        for path, value in encoder_kernels(params).items()
    }
    return int8_exec.IntegerModel(Bert(config), weights), len(weights)


def fp8_model(config: BertConfig, params: dict) -> tuple[int8_exec.IntegerModel, int]:
    """The teacher run with every encoder Dense kernel as e4m3 (per channel) and activations
    e4m3 per tensor at run time: float8 x float8 matmuls (FP8 tensor cores on Hopper)."""
    weights = int8_exec.fp8_weights(encoder_kernels(params))
    return int8_exec.IntegerModel(Bert(config), weights, scheme="fp8"), len(weights)


def static_ranges(config: BertConfig, params: dict) -> dict:
    """Calibrated input ranges of every encoder Dense layer (one random batch, as the W8A8
    post-training stage calibrates on train batches): static scales, no absmax at run time."""
    length = min(128, config.max_position_embeddings)
    ids = jax.random.randint(jax.random.key(7), (8, length), 1000, 29000)
    model = Bert(config)
    return calibrate(
        lambda b: model.apply({"params": params}, b, jnp.ones_like(b)),
        [ids],
        [(r"bert/encoder/.*", True), (".*", None)],
        layer_types=(Linear,),
    )


def with_static_ranges(make: Callable) -> Callable:
    """`make` (int8_model or fp8_model) with calibrated static input ranges."""

    def build(config: BertConfig, params: dict) -> tuple[int8_exec.IntegerModel, int]:
        model, kernels = make(config, params)
        return dataclasses.replace(model, ranges=static_ranges(config, params)), kernels

    return build


def quantized_dots(model: int8_exec.IntegerModel, params: dict, seq_len: int) -> int:
    """How many int8 x int8 -> int32 (or float8 x float8) matmuls a forward of `model` runs
    (traced, not run)."""
    ids = jnp.ones((1, seq_len), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, ids).logits)(params)
    operand = jnp.dtype(jnp.int8 if model.scheme == "int8" else jnp.float8_e4m3fn)
    return sum(
        1
        for eqn in _inner_eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "dot_general"
        and all(jnp.dtype(v.aval.dtype) == operand for v in eqn.invars)
    )


def _inner_eqns(jaxpr) -> list:
    """Every equation of `jaxpr` and of the sub-jaxprs (jit, custom rules, scans) inside it."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _inner_eqns(inner)
    return found


def power_keep(name: str) -> tuple[float, ...]:
    """PoWER-BERT's per-layer retention of configs/dynamic.py's run `name`."""
    return tuple(load_config(f"{REPO}/configs/dynamic.py:{name}").token_keep)


def candidates(
    teacher: BertConfig, embedding_size: int
) -> list[tuple[str, str, Callable[[dict], tuple]]]:
    """(row name as in the SST-2 result files, the shape in words, build) of each compressed
    family; `build(teacher_params) -> (model with apply, params, config)`."""
    layers, heads = teacher.num_hidden_layers, teacher.num_attention_heads
    ffn = teacher.intermediate_size

    def fresh(config: BertConfig) -> Callable[[dict], tuple]:
        return lambda _: (Bert(config), init_params(config, jax.random.key(1)), config)

    def transformed(transform: Callable) -> Callable[[dict], tuple]:
        def build(params: dict) -> tuple:
            config, out = transform(teacher, params)
            return Bert(config), out, config

        return build

    def quantized(make: Callable) -> Callable[[dict], tuple]:
        def build(params: dict) -> tuple:
            model, kernels = make(teacher, params)
            if (found := quantized_dots(model, params, 16)) != kernels:
                raise RuntimeError(
                    f"{model.scheme} execution ran {found} {model.scheme} matmuls for "
                    f"{kernels} kernels"
                )
            return model, params, teacher

        return build

    def power(name: str) -> Callable[[dict], tuple]:
        config = teacher.replace(token_keep=power_keep(name))
        return lambda params: (Bert(config), params, config)

    half = layers // 2
    combined = teacher.replace(
        num_hidden_layers=half,
        heads_per_layer=(heads // 2,) * half,
        intermediate_per_layer=(ffn // 2,) * half,
    )
    return [
        (
            "layer_drop_kd l3",
            f"{half} of {layers} layers (every other)",
            transformed(transforms.keep_layers(keep=half)),
        ),
        (
            "layer_drop_kd l2",
            f"{layers // 3} of {layers} layers (every other)",
            transformed(transforms.keep_layers(keep=layers // 3)),
        ),
        (
            "heads_kd h50",
            f"{heads // 2} of {heads} heads in every layer (the trained model's "
            "global pruning spreads the same total unevenly)",
            fresh(teacher.replace(heads_per_layer=(heads // 2,) * layers)),
        ),
        (
            "ffn_kd f50",
            f"FFN width {ffn // 2} of {ffn} in every layer",
            fresh(teacher.replace(intermediate_per_layer=(ffn // 2,) * layers)),
        ),
        (
            "combined_kd l3_h50_f50",
            f"{half} layers, {heads // 2} heads, FFN {ffn // 2}",
            fresh(combined),
        ),
        (
            "low_rank_ffn r50",
            "FFN kernels at 50% of full rank (SVD)",
            transformed(transforms.low_rank(target="ffn", fraction=0.5)),
        ),
        (
            "low_rank_ffn r25",
            "FFN kernels at 25% of full rank (SVD)",
            transformed(transforms.low_rank(target="ffn", fraction=0.25)),
        ),
        (
            f"factorize e{embedding_size}",
            f"word embeddings V x {embedding_size} x H",
            transformed(transforms.factorize_embeddings(embedding_size, init="fresh")),
        ),
        (
            "int8_execution_w8a8_dynamic",
            "the teacher's encoder kernels int8 per channel, "
            "activations int8 per tensor, int8 x int8 -> int32 matmuls (IntegerModel)",
            quantized(int8_model),
        ),
        (
            "int8_execution_w8a8_static",
            "as int8_execution_w8a8_dynamic, with calibrated (static) input scales: no "
            "absmax reduction at run time, as the W8A8 post-training artefact runs",
            quantized(with_static_ranges(int8_model)),
        ),
        (
            "fp8_execution_e4m3_dynamic",
            "the teacher's encoder kernels e4m3 per channel, activations e4m3 per tensor, "
            "float8 x float8 matmuls (IntegerModel, scheme 'fp8')",
            quantized(fp8_model),
        ),
        (
            "fp8_execution_e4m3_static",
            "as fp8_execution_e4m3_dynamic, with calibrated (static) input scales",
            quantized(with_static_ranges(fp8_model)),
        ),
        ("power_mild", f"PoWER-BERT retention {power_keep('power_mild')}", power("power_mild")),
        (
            "power_strong",
            f"PoWER-BERT retention {power_keep('power_strong')}",
            power("power_strong"),
        ),
    ]


def latency_section(suite: Suite) -> None:
    seq_len = 32 if suite.quick else 128
    batches = (1, 8) if suite.quick else (1, 128)
    rounds = 5 if suite.quick else (30 if suite.accelerator else 10)
    embedding = 16 if suite.quick else 128
    suite.note(
        "early exit: skipped: how many layers each example runs depends on its confidence on "
        "real data, which random weights do not have; benchmarks/dynamic.py times it on SST-2"
    )
    minilm = (QUICK_TEACHER if suite.quick else TEACHER).replace(dtype=suite.dtype)
    families = candidates(minilm, embedding)
    teachers = [("", minilm, families)]
    # The int8 target is on BERT-base: its quantized rows against its own forward.
    base = (QUICK_TEACHER if suite.quick else throughput.SHAPES["bert-base"]).replace(
        dtype=suite.dtype
    )
    executed = [c for c in candidates(base, embedding) if "_execution_" in c[0]]
    teachers.append(("bert-base ", base, executed))
    for prefix, teacher_config, members in teachers:
        teacher_params = init_params(teacher_config, jax.random.key(0))
        teacher_forward = jitted_forward(Bert(teacher_config))
        teacher_count = count(teacher_params)
        for family_name, shape, build in members:
            name = prefix + family_name
            keys = [(suite.device_name, name, b, seq_len, suite.dtype) for b in batches]
            if suite.done("device_latency.json", keys, f"latency {name}"):
                continue
            if not suite.budget.fits("latency family", f"latency {name}"):
                continue
            setting = (teacher_forward, teacher_params, teacher_count, seq_len, batches, rounds)
            suite.guarded(
                f"latency {name}", functools.partial(family, suite, name, shape, build, *setting)
            )


def family(
    suite: Suite,
    name: str,
    shape: str,
    build: Callable[[dict], tuple],
    teacher_forward: Callable,
    teacher_params: dict,
    teacher_count: int,
    seq_len: int,
    batches: tuple[int, ...],
    rounds: int,
) -> None:
    """The paired latency rows of one compressed family, one per batch size."""
    model, params, config = build(teacher_params)
    forward = jitted_forward(model)
    for batch_size in batches:
        ids = jax.random.randint(jax.random.key(batch_size), (batch_size, seq_len), 1000, 29000)
        mask = jnp.ones_like(ids)

        def teacher(ids: jax.Array = ids, mask: jax.Array = mask) -> jax.Array:
            return jax.block_until_ready(teacher_forward(teacher_params, ids, mask))

        def candidate(ids: jax.Array = ids, mask: jax.Array = mask) -> jax.Array:
            return jax.block_until_ready(forward(params, ids, mask))

        teacher()  # compile both; paired_speedup runs each once more, untimed
        candidate()
        speedup, teacher_s, candidate_s, _ = paired_speedup(teacher, candidate, rounds)
        row = {
            "name": f"{name} b{batch_size}",
            "family": name,
            "device": suite.device_name,
            "platform": suite.device.platform,
            "dtype": suite.dtype,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "rounds": rounds,
            "shape": shape,
            "weights": RANDOM_WEIGHTS,
            "layers": config.num_hidden_layers,
            "params": count(params),
            "teacher_params": teacher_count,
            "latency_s": candidate_s,
            "teacher_latency_s": teacher_s,
            "metric": "latency_ratio",
            "value": speedup,
            "latency_ratio": {platform_key(suite.device): speedup},
        }
        suite.add("device_latency.json", row, LATENCY_SHOWN)


def count(params: dict) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# 4. One SST-2 epoch

EPOCH_ROW = "sst2_finetune_epoch"
EPOCH_SHOWN = (
    "name",
    "value",
    "compile_s",
    "time_to_step_s",
    "train_s",
    "wall_s",
    "tokens_per_s",
)


def epoch_overrides(quick: bool, model: str | None, cache: Path) -> list[str]:
    log_every = 2 if quick else 50  # the step whose time is reported
    overrides = ["checkpoint_every=1000000000", f"compile_cache={cache}", f"log_every={log_every}"]
    overrides += [f"model={model}"] if model else []
    return overrides + (QUICK_EPOCH if quick else [])


def epoch_config(overrides: list[str]) -> ml_collections.ConfigDict:
    return load_config(EPOCH_CONFIG, overrides)


def check_epoch_assets(config: ml_collections.ConfigDict) -> None:
    """End the run now, in one line, if the epoch's model (a folder, or a name looked up in
    $JAXCOMPRESS_MODEL_ROOT by its last component, as `resolve_model_dir` does; never the
    hub) or the SST-2 files are missing."""
    name = config.model.rsplit("/", 1)[-1]
    root = assets.model_root()
    given = Path(config.model).expanduser()
    folder = given if given.is_dir() else (root / name if root else None)
    if folder is None or not all(
        (folder / f).exists() for f in ("config.json", "model.safetensors")
    ):
        held = (
            sorted(p.name for p in root.iterdir() if p.is_dir()) if root and root.is_dir() else []
        )
        raise SystemExit(
            f"device_suite: no model {config.model!r} in JAXCOMPRESS_MODEL_ROOT={root} (it "
            f"holds {', '.join(held) or 'none'}); run `bash ../shared/device/prep.sh {name}` "
            "before carrying .device, or leave the epoch out (--sections throughput latency)"
        )
    glue = assets.glue_dir()
    if glue is None or not (glue / "SST-2" / "train.tsv").exists():
        raise SystemExit(
            f"device_suite: no SST-2/train.tsv in JAXCOMPRESS_GLUE_DIR={glue}; set it (on the "
            "GPU machine `source .device/env.sh` does) or leave the epoch out"
        )


def epoch_section(suite: Suite, overrides: list[str]) -> None:
    if suite.done("sst2_epoch.json", [(suite.device_name, EPOCH_ROW)], "the SST-2 epoch"):
        return
    if not suite.budget.fits("epoch", "the SST-2 epoch"):
        return
    config = epoch_config(overrides)
    resolved = with_device_defaults(config)
    workdir = suite.tmp / "sst2_epoch"
    started = time.time()
    summary = loop.train(config, workdir)
    wall = time.time() - started
    step = config.log_every
    logged = run_dir.read_metrics(workdir)
    at_step = next((r["time"] for r in logged if r.get("step") == step and "loss" in r), None)
    compile_s = summary["compile_seconds"]
    reference = json.loads((RESULTS / "sst2_teacher.json").read_text())["teacher"]
    row = {
        "name": EPOCH_ROW,
        "device": suite.device_name,
        "platform": suite.device.platform,
        "model": config.model,
        "task": "sst2",
        "metric": "accuracy",
        "value": summary["value"],
        "relative": summary["value"] / reference["value"],
        "relative_to": f"{reference['model']} ({reference['value']:.4f}, sst2_teacher.json)",
        "seeds": 1,
        "seed": config.seed,
        "dtype": resolved.dtype,
        "buckets": list(resolved.buckets),
        "precompile": resolved.precompile,
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "batch_size": config.train.batch_size,
        "train_examples": summary["train_examples"],
        "compile_seconds": compile_s,
        "compile_s": sum(compile_s.values()),
        "time_to_step": step,
        "time_to_step_s": None if at_step is None else at_step - started,
        "train_s": summary["train_seconds_this_run"],
        "wall_s": wall,
        "tokens_per_s": summary["tokens_per_s"],
        "overrides": overrides,
        "compile_cache": "cold (a fresh folder)",
    }
    suite.add("sst2_epoch.json", row, EPOCH_SHOWN)


# ---------------------------------------------------------------------------------------------
# Result files other than throughput.json: (row key, row order, benchmark name, notes).


def _latency_key(row: dict) -> tuple:
    return (row["device"], row["family"], row["batch_size"], row["seq_len"], row["dtype"])


def _epoch_key(row: dict) -> tuple:
    return (row["device"], row["name"])


def _section_key(row: dict) -> tuple:
    return (row["device"], row["section"])


def _section_order(row: dict) -> tuple:
    return (row["device"], row["ended_at_s"])


RESULT_FILES = {
    "device_latency.json": (
        _latency_key,
        _latency_key,
        "device_latency",
        {
            "setting": "teacher shape MiniLM-L6-H384 (minilm-l6-sst2-teacher), 2 labels; each "
            "candidate and the teacher jitted, full-length random batches (no padding), "
            "forwards interleaved per round with alternating order; value = latency_ratio = "
            "median over rounds of teacher seconds / candidate seconds (above 1 is faster)",
            "weights": RANDOM_WEIGHTS,
        },
    ),
    "sst2_epoch.json": (
        _epoch_key,
        _epoch_key,
        "sst2_epoch",
        {
            "setting": "configs/finetune.py:sst2 (one epoch, batch 32, lr 1e-4) through "
            "jaxcompress.train.loop.train, no intermediate checkpoints, a cold compilation "
            "cache; compile_s = first calls of each new train and eval shape; time_to_step_s = "
            "from calling train (data loading included) to the logged step",
        },
    ),
    "device_suite.json": (_section_key, _section_order, "device_suite", {}),
}


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, help="where the result files go")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and steps (CPU check)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip what no longer fits")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--epoch-model", help="fine-tune this model instead of the config's")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip rows this device already has in the files the results merge with",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="compute dtype of the throughput and latency rows (default: bfloat16 on an "
        "accelerator, float32 on CPU); the epoch keeps its config's",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Before JAX starts on a GPU: grow its memory on demand, so that PyTorch fits beside it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="device_suite_") as tmp:
        out_dir = args.out_dir or (
            Path(tempfile.mkdtemp(prefix="device_suite_quick_")) if args.quick else RESULTS
        )
        overrides = epoch_overrides(args.quick, args.epoch_model, Path(tmp) / "xla_cache")
        if "epoch" in args.sections:
            check_epoch_assets(epoch_config(overrides))
        out_dir.mkdir(parents=True, exist_ok=True)
        device = jax.devices()[0]
        accelerator = device.platform != "cpu"
        column = 0 if accelerator else (2 if args.quick else 1)
        suite = Suite(
            out_dir=out_dir,
            quick=args.quick,
            budget=Budget(args.budget_s, column, start=started),
            device=device,
            dtype=args.dtype or ("bfloat16" if accelerator else "float32"),
            tmp=Path(tmp),
            resume=args.resume,
        )
        for name in (*RESULT_FILES, "throughput.json"):
            suite.base(name)  # fixed before this run writes anything
        suite.say(f"{suite.device_name}, {suite.dtype}; results in {out_dir}")
        run(suite, args.sections, overrides)
        suite.say(f"done in {suite.budget.elapsed():.0f} s; results in {out_dir}")
    if suite.failed:
        raise SystemExit(f"device_suite: {len(suite.failed)} failed: {'; '.join(suite.failed)}")


def run(suite: Suite, sections: list[str], overrides: list[str]) -> None:
    """The peaks, then every section asked for in order of importance, each recorded in
    device_suite.json as it ends."""
    items = throughput_items(suite.quick)
    first = [i for i in items if i[1] == "finetune" and i[2] == items[0][2]]
    rest = [i for i in items if i not in first]
    steps = [("peaks", lambda: measure_peaks(suite))]
    if "throughput" in sections:
        steps.append(("throughput_first", lambda: each_row(suite, first)))
    if "latency" in sections:
        latency = functools.partial(latency_section, suite)
        steps.append(("latency", lambda: suite.guarded("latency", latency)))
    if "epoch" in sections:
        epoch = functools.partial(epoch_section, suite, overrides)
        steps.append(("epoch", lambda: suite.guarded("the SST-2 epoch", epoch)))
    if "throughput" in sections:
        steps.append(("throughput_rest", lambda: each_row(suite, rest)))
    column = suite.budget.cost_column
    planned = 0
    if "throughput" in sections:
        planned += sum(COST[f"{mode} {shape}"][column] for shape, mode, _ in items)
    if "latency" in sections:
        families = len(candidates(TEACHER, 128))
        planned += families * COST["latency family"][column]
    planned += COST["epoch"][column] if "epoch" in sections else 0
    suite.say(
        f"plan: {', '.join(sections)}; about {planned} s, budget {suite.budget.seconds:.0f} s"
    )
    for name, body in steps:
        t0 = time.perf_counter()
        body()
        record = {
            "name": name,
            "section": name,
            "device": suite.device_name,
            "platform": suite.device.platform,
            "seconds": time.perf_counter() - t0,
            "ended_at_s": suite.budget.elapsed(),
        }
        suite.rows.setdefault("device_suite.json", []).append(record)
        suite.write("device_suite.json")
        suite.say(f"section {name}: {record['seconds']:.0f} s")


def each_row(suite: Suite, items: list[tuple[str, str, int]]) -> None:
    for shape, mode, seq_len in items:
        what = f"throughput {shape} {mode} s{seq_len}"
        suite.guarded(what, functools.partial(throughput_row, suite, shape, mode, seq_len))


if __name__ == "__main__":
    main()
