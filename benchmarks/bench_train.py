"""Training throughput of the jitted train step: tokens/s, step time, MFU and device memory,
optionally against the dense twin and transformers' PyTorch ``BitNetForCausalLM`` on the same
configuration, weights and batches.

Each contestant (our step per ``--attention`` x ``--matmul`` value, the dense twin with
``--compare-dense``, transformers' model with ``--compare-hf``, eager and/or ``torch.compile``) is
compiled (timed apart) and warmed up; then ``--steps`` steps are timed one by one (each waited for),
in two blocks per contestant taken in turn (A B B A) so that a shared machine's changing load hits
all alike, and the median is reported. Batches are random token ids (no tokenizer, no dataset), so
the script needs only jax, flax, optax, numpy and PyYAML (plus torch and transformers for
``--compare-hf``).

    .venv/bin/python benchmarks/bench_train.py --config configs/tiny.yaml --compare-hf --compare-dense
    .venv/bin/python benchmarks/bench_train.py --config configs/bitnet_95m.yaml --attention xla,cudnn --matmul float,int8
    .venv/bin/python benchmarks/bench_train.py --config configs/tiny.yaml --profile      # where time goes
    .venv/bin/python benchmarks/bench_train.py --config configs/bitnet_95m.yaml --dry-run  # compile only

MFU = tokens/s x FLOPs/token / (peak FLOP/s per device x devices), FLOPs/token = 6 N + 12 L d T
(PaLM appendix B; N all parameters with the tied embedding counted once, as the LM-head matmul).
Peak: ``--peak-flops`` or the device kind's dense bf16 peak (H100/H200 989 TFLOP/s); none on CPU
unless given. Peak device memory is the allocator's peak (JAX ``memory_stats``, PyTorch
``max_memory_allocated``) and is reported only where the runtime gives it and, for JAX, when one
contestant ran in the process (``benchmarks/gpu_bench.sh`` runs one per process).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import int8_hlo  # noqa: E402  (benchmarks/int8_hlo.py: no jax needed)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/tiny.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--attention", help="comma list of model.attention values to measure (default: the config's)")
    p.add_argument("--matmul", help="comma list of model.matmul values to measure (default: the config's)")
    p.add_argument("--compare-dense", action="store_true",
                   help="also time the dense twin (model.quantization none) for each --attention value")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' PyTorch BitNet")
    p.add_argument("--hf-only", action="store_true", help="time only the PyTorch model")
    p.add_argument("--hf-mode", default="eager",
                   help="comma list of how to run the PyTorch model: eager, compile (torch.compile)")
    p.add_argument("--hlo-out", help="write the int8 contestants' BitLinear products from the compiled HLO here")
    p.add_argument("--autodiff-matmul", action="store_true",
                   help="the linear layers' products with autodiff's backward (float32 x compute-dtype "
                        "products), as before model.compute_dtype_matmul: to measure what that change gained")
    p.add_argument("--profile", action="store_true", help="trace a few steps and print where the time goes")
    p.add_argument("--dry-run", action="store_true",
                   help="compile the step for the config and print XLA's cost and memory analysis; no steps")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for MFU (default: known GPUs)")
    p.add_argument("--total-steps", type=int, help="steps of the full run to estimate (default: train.steps)")
    p.add_argument("--out", help="also write the table (Markdown) to this file")
    p.add_argument("--json", help="also write the results as JSON to this file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- shared pieces

def load_config(args):
    from bitnet_jax import config as config_lib

    return config_lib.load(args.config, args.overrides)


def variant(cfg, **model):
    """``cfg`` with some ``model.*`` keys replaced (validated again)."""
    from bitnet_jax import config as config_lib

    data = cfg.to_dict()
    data["model"].update(model)
    return config_lib.from_dict(data)


def contestant_name(cfg, autodiff_matmul: bool = False) -> str:
    m = cfg.model
    how = ", autodiff matmul backward" if autodiff_matmul else ""
    if m.quantization == "none":
        return f"bitnet-jax dense twin (attention {m.attention}{how})"
    return f"bitnet-jax BitNet (matmul {m.matmul}, attention {m.attention}{how})"


def use_autodiff_matmul() -> None:
    """Swaps ``model.compute_dtype_matmul`` for the plain expression it replaced, whose autodiff
    backward multiplies the float32-widened cotangent (for ``--autodiff-matmul``)."""
    import jax.numpy as jnp

    from bitnet_jax import model

    model.compute_dtype_matmul = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def jax_contestants(cfg, args) -> list[dict]:
    """The ``model.*`` overrides to time: BitNet per --attention x --matmul value, plus the dense twin
    per --attention value with --compare-dense (a dense config: the twin alone)."""
    attentions = [a.strip() for a in (args.attention or cfg.model.attention).split(",")]
    matmuls = [m.strip() for m in (args.matmul or cfg.model.matmul).split(",")]
    out = []
    for attention in attentions:
        if cfg.model.quantization == "bitnet":
            out += [{"attention": attention, "matmul": m} for m in matmuls]
        if args.compare_dense or cfg.model.quantization == "none":
            out.append({"attention": attention, "quantization": "none", "matmul": "float"})
    return out


def tags(cfg) -> dict:
    """What a row measured, for the ratios (``ratios``) and the results JSON."""
    m = cfg.model
    return {"framework": "bitnet-jax", "model": "dense" if m.quantization == "none" else "bitnet",
            "matmul": m.matmul, "attention": m.attention}


def random_batches(cfg, n: int = 4, seed: int = 0) -> np.ndarray:
    """``[n, batch, seq_len + 1]`` int32 token ids, uniform over the vocabulary."""
    t = cfg.train
    return np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (n, t.batch_size, t.seq_len + 1),
                                                dtype=np.int32)


def device_summary() -> str:
    import jax

    d = jax.devices()
    return f"{len(d)} x {d[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"


@dataclasses.dataclass
class Result:
    name: str
    step_ms: float  # median
    tokens_per_s: float
    compile_s: float
    first_loss: float
    mfu: float | None = None
    step_ms_min: float = 0.0
    steps: int = 0
    peak_mem_gib: float | None = None  # the allocator's peak (see the module docstring)
    xla_mem_gib: float | None = None  # XLA's buffer assignment: arguments + temporaries
    estimate_mem_gib: float | None = None  # bitnet_jax.memory's estimate (the dry run's)
    int8_dot: str | None = None  # int8_hlo's verdict on the compiled HLO (matmul int8 only)
    tags: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Runner:
    """One contestant: ``step(i)`` runs training step i to completion (waited for)."""

    name: str
    step: Callable[[int], None]
    compile_s: float
    first_loss: float
    live: tuple = ()  # (compiled, state holder, batches) for --profile
    times: list = dataclasses.field(default_factory=list)
    peak_mem: Callable[[], float | None] = lambda: None  # bytes, read after the timed steps
    info: dict = dataclasses.field(default_factory=dict)  # further Result fields (memory, tags, ...)

    def result(self, tokens: int, flops_per_token: float, peak_total: float | None) -> Result:
        med = statistics.median(self.times)
        tps = tokens / med
        peak = self.peak_mem()
        return Result(self.name, med * 1e3, tps, self.compile_s, self.first_loss,
                      tps * flops_per_token / peak_total if peak_total else None, min(self.times) * 1e3,
                      len(self.times), peak_mem_gib=peak / 2**30 if peak else None, **self.info)


class Stopped(Exception):
    """SIGTERM (e.g. from ``timeout``): stop measuring and report what was measured."""


def _stop_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, handler)


def time_in_blocks(runners: list[Runner], steps: int, rounds: int = 2) -> list[str]:
    """Times ``steps`` steps of every runner, in ``rounds`` blocks per runner taken in turn (A B, then
    B A), so a shared machine's changing load hits all alike. Blocks, not single alternating steps: a
    runtime's idle worker threads keep spinning for a while after its step (PyTorch's OpenMP pool
    does), and a contestant stepping right after another would pay for that; each block starts with
    one untimed step for the same reason. A runner that fails (out of memory, say) drops out; the
    messages are returned."""
    failures = []
    sizes = [steps // rounds + (1 if k < steps % rounds else 0) for k in range(rounds)]
    for k, size in enumerate(sizes):
        for r in (list(runners) if k % 2 == 0 else list(reversed(runners))):
            try:
                r.step(len(r.times))  # settle: not timed
                for _ in range(size):
                    t0 = time.perf_counter()
                    r.step(len(r.times))
                    r.times.append(time.perf_counter() - t0)
            except Stopped:
                failures.append(f"stopped by SIGTERM after {len(r.times)} timed steps of {r.name}; "
                                "the table shows those measured")
                return failures
            except Exception as e:  # report and let the others finish
                failures.append(f"{r.name}: failed at timed step {len(r.times)}: {type(e).__name__}: "
                                f"{str(e)[:300]}")
                runners.remove(r)
    return failures


# --------------------------------------------------------------------------- ours (JAX)

def build_step(cfg):
    """``(jitted_step, state, mesh, graphdef)`` for ``cfg`` on every device."""
    from bitnet_jax import sharding, train_state

    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_fits(cfg, mesh)
    graphdef, state = train_state.init_state(cfg)
    state, shardings = train_state.place_state(state, mesh)
    step = train_state.make_train_step(cfg, graphdef, mesh, shardings)
    return step, state, mesh, graphdef


def jax_runner(cfg, batches: np.ndarray, warmup: int, name: str, alone: bool = True) -> Runner:
    """Compiles (timed) and warms up our train step; the state lives in the returned closure.
    ``alone``: the only JAX contestant of the process, so the device's peak memory is its own."""
    import jax

    from bitnet_jax import sharding
    from bitnet_jax.memory import estimate_bytes

    step, state, mesh, _ = build_step(cfg)
    device_batches = [sharding.global_batch(b, mesh) for b in batches]
    t0 = time.perf_counter()
    compiled = step.lower(state, device_batches[0]).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    first = {}

    def one(i: int) -> None:
        holder["state"], m = compiled(holder["state"], device_batches[i % len(device_batches)])
        jax.block_until_ready((holder["state"], m))
        first.setdefault("loss", m["loss"])

    for i in range(max(warmup, 1)):
        one(i)
    info = {"tags": tags(cfg), "estimate_mem_gib": estimate_bytes(cfg)["total"] / 2**30}
    mem = compiled.memory_analysis()
    if mem is not None:
        info["xla_mem_gib"] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30
    if cfg.model.quantization == "bitnet" and cfg.model.matmul == "int8":
        info["int8_dot"] = int8_hlo.verdict(int8_hlo.find_matmuls(compiled.as_text()))

    def peak_mem() -> float | None:
        stats = jax.local_devices()[0].memory_stats() if alone else None
        return (stats or {}).get("peak_bytes_in_use")

    return Runner(name, one, compile_s, float(first["loss"]), live=(compiled, holder, device_batches),
                  peak_mem=peak_mem, info=info)


# --------------------------------------------------------------------------- theirs (PyTorch)

def hf_model(cfg, params):
    """transformers' BitNetForCausalLM with online autobitlinear quantization and our weights."""
    from bitnet_jax.hf import torch_reference_model

    return torch_reference_model(cfg.model, params)


def hf_runner(cfg, params, batches: np.ndarray, warmup: int, mode: str = "eager") -> Runner:
    """Forward, float32 cross-entropy, backward, global-norm clipping and AdamW: one optimizer step of
    transformers' model, as ours does (same weights, batches, optimizer settings). With bf16 compute on
    a GPU: float32 master weights under bf16 autocast and the fused AdamW, the usual fast PyTorch
    recipe. ``mode`` ``compile``: the model under ``torch.compile`` (the first step compiles it)."""
    import contextlib

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = cfg.model.compute_dtype == "bfloat16" and device == "cuda"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = hf_model(cfg, params).to(device=device).train()
    forward = torch.compile(model) if mode == "compile" else model
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.peak_lr_1, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=device == "cuda")
    data = [torch.from_numpy(b.astype(np.int64)).to(device) for b in batches]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = {}

    def one(i: int) -> None:
        batch = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            logits = forward(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sync()
        first.setdefault("loss", loss.detach().item())

    t0 = time.perf_counter()
    one(0)  # includes torch.compile (of transformers' quantizers; with mode compile, of the model)
    compile_s = time.perf_counter() - t0
    for i in range(1, warmup):
        one(i)
    kind = "BitNet" if cfg.model.quantization == "bitnet" else "dense"
    how = ", torch.compile" if mode == "compile" else ""
    name = f"transformers {kind} (torch {torch.__version__}, {device}{', bf16 autocast' if autocast else ''}{how})"
    info = {"tags": {"framework": "transformers", "model": "dense" if kind == "dense" else "bitnet",
                     "torch_compile": mode == "compile"}}
    peak = (lambda: float(torch.cuda.max_memory_allocated())) if device == "cuda" else (lambda: None)
    return Runner(name, one, compile_s, first["loss"], peak_mem=peak, info=info)


# --------------------------------------------------------------------------- where the time goes

SCOPES = ("lm_head", "loss", "act_quant", "weight_quant", "bitlinear_matmul", "attention", "rope", "rmsnorm",
          "mlp_act", "embed", "optimizer")


def _hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata (the JAX op and its named scopes)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _category(op_name: str) -> str:
    """``jit(train_step)/transpose(jvp(lm_head))/dot_general`` -> ``lm_head (bwd)``: the innermost named
    scope (see model.py), forward or backward; the optimizer update is outside the differentiated
    part; an op without metadata is ``other``."""
    if not op_name:
        return "other"
    found = [(m.start(), s) for s in SCOPES for m in re.finditer(rf"\b{s}\b", op_name)]
    part = max(found)[1] if found else ("optimizer" if "jvp" not in op_name and "transpose" not in op_name
                                        else "other")
    direction = "bwd" if "transpose(" in op_name else "fwd"
    return f"{part} ({direction})" if part != "optimizer" else part


# The categories of step time, from the named scopes (forward and backward together).
BREAKDOWN = {"bitlinear_matmul": "matmuls", "lm_head": "matmuls", "attention": "attention",
             "act_quant": "quantizers", "weight_quant": "quantizers", "rmsnorm": "norms", "loss": "loss",
             "optimizer": "optimizer"}


def breakdown(cats: dict[str, float]) -> dict[str, float]:
    """``{"lm_head (bwd)": ms, ...}`` -> ms per step in matmuls, attention, quantizers, norms, loss,
    optimizer and other (RoPE, the MLP activation, the embedding, copies)."""
    out = dict.fromkeys(("matmuls", "attention", "quantizers", "norms", "loss", "optimizer", "other"), 0.0)
    for cat, ms in cats.items():
        out[BREAKDOWN.get(cat.split(" (")[0], "other")] += ms
    return out


# Lines of a device plane that summarise the kernels of the stream lines (counting them would double).
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Launch Stats", "TensorFlow Ops", "Framework Ops",
                  "Framework Name Scope", "Source code", "XLA TraceMe")


def _timed_events(data, names: dict[str, str]):
    """``(hlo op, op_name, duration_ns)`` of every kernel (device planes: the stream lines' events,
    named by their ``hlo_op`` and ``tf_op`` stats) or, with no device plane (CPU), of every
    host-thread event of an HLO op."""
    devices = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in devices or data.planes:
        for line in plane.lines:
            if line.name == "python" or line.name in _DERIVED_LINES:
                continue
            for ev in line.events:
                stats = dict(ev.stats) if devices else {}
                op = str(stats.get("hlo_op") or ev.name)
                if devices or op in names:
                    yield op, names.get(op) or str(stats.get("tf_op", "")), ev.duration_ns


def profile(compiled, state, batches, steps: int = 5, top: int = 15) -> tuple[dict, list]:
    """Traces ``steps`` steps; returns ({category: ms per step}, [(op, ms per step, op_name)...])
    summed over all threads (on CPU: thread time; on GPU: kernel time)."""
    import jax

    names = _hlo_op_names(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for i in range(steps):
                state, m = compiled(state, batches[i % len(batches)])
                jax.block_until_ready((state, m))
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    per_op, op_names = collections.Counter(), {}
    for op, op_name, ns in _timed_events(data, names):
        per_op[op] += ns / 1e6 / steps
        op_names[op] = op_name
    cats = collections.Counter()
    for op, ms in per_op.items():
        cats[_category(op_names[op])] += ms
    ops = [(op, ms, op_names[op] or "?") for op, ms in per_op.most_common(top)]
    return dict(cats.most_common()), ops


# --------------------------------------------------------------------------- dry run

def dry_run(cfg) -> dict:
    """Compiles the train step for ``cfg`` without running it: XLA's FLOPs and memory against ours."""
    import jax

    from bitnet_jax import sharding, train_state
    from bitnet_jax.model import count_params, flops_per_token

    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_fits(cfg, mesh)
    graphdef, abstract = train_state.abstract_state(cfg)
    shardings = sharding.state_shardings(abstract, mesh)
    step = train_state.make_train_step(cfg, graphdef, mesh, shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), np.int32,
                                 sharding=sharding.batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step.lower(abstract, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    ours = flops_per_token(cfg.model, cfg.train.seq_len) * cfg.tokens_per_step
    out = {"parameters": count_params(cfg.model), "compile_s": compile_s, "formula_flops_per_step": ours,
           "xla_flops_per_step": float(cost.get("flops", float("nan"))) if cost else None,
           "xla_transcendentals": float(cost.get("transcendentals", 0)) if cost else None}
    if mem is not None:
        out["device_memory_gib"] = {k: getattr(mem, k) / 2**30 for k in
                                    ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
                                    if hasattr(mem, k)}
    return out


# --------------------------------------------------------------------------- report

def format_table(rows: list[Result], cfg, total_steps: int) -> str:
    lines = [f"| run | step ms (median) | tokens/s | MFU | peak memory | compile s | first loss | "
             f"{total_steps:,} steps |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        mem = f"{r.peak_mem_gib:.2f} GiB" if r.peak_mem_gib is not None else "-"
        hours = r.step_ms / 1e3 * total_steps / 3600
        lines.append(f"| {r.name} | {r.step_ms:.1f} | {r.tokens_per_s:,.0f} | {mfu} | {mem} | {r.compile_s:.1f} | "
                     f"{r.first_loss:.4f} | {hours:.2f} h |")
    return "\n".join(lines)


RATIOS = {  # key: (what, numerator's tags, denominator's tags); the best row of each side
    "bitnet_vs_transformers_eager": ("bitnet-jax BitNet / transformers BitNet (eager)",
                                     {"framework": "bitnet-jax", "model": "bitnet"},
                                     {"framework": "transformers", "model": "bitnet", "torch_compile": False}),
    "bitnet_vs_transformers_compile": ("bitnet-jax BitNet / transformers BitNet (torch.compile)",
                                       {"framework": "bitnet-jax", "model": "bitnet"},
                                       {"framework": "transformers", "model": "bitnet", "torch_compile": True}),
    "bitnet_vs_dense": ("bitnet-jax BitNet / bitnet-jax dense twin",
                        {"framework": "bitnet-jax", "model": "bitnet"}, {"framework": "bitnet-jax", "model": "dense"}),
    "int8_vs_dense": ("bitnet-jax BitNet matmul int8 / bitnet-jax dense twin",
                      {"framework": "bitnet-jax", "model": "bitnet", "matmul": "int8"},
                      {"framework": "bitnet-jax", "model": "dense"}),
    "compute_dtype_matmul_gain": ("bitnet-jax BitNet matmul float / the same with autodiff's matmul backward",
                                  {"framework": "bitnet-jax", "model": "bitnet", "matmul": "float"},
                                  {"framework": "bitnet-jax", "model": "bitnet", "matmul": "float",
                                   "matmul_backward": "autodiff"}),
}


def ratios(rows: list[Result]) -> dict[str, float]:
    """tokens/s ratios of ``RATIOS`` whose both sides were measured. Rows of the old autodiff matmul
    backward (``--autodiff-matmul``) count only where a ratio asks for them."""
    def best(want: dict) -> Result | None:
        matching = [r for r in rows if all(r.tags.get(k, False) == v for k, v in want.items())
                    and (r.tags.get("matmul_backward") != "autodiff" or "matmul_backward" in want)]
        return max(matching, key=lambda r: r.tokens_per_s) if matching else None

    out = {}
    for key, (_, num, den) in RATIOS.items():
        a, b = best(num), best(den)
        if a and b:
            out[key] = a.tokens_per_s / b.tokens_per_s
    return out


def format_ratios(values: dict[str, float]) -> str:
    return "\n".join(f"{RATIOS[k][0]} tokens/s: {v:.2f}x" for k, v in values.items())


def format_memory(rows: list[Result]) -> str:
    """Measured peak beside XLA's buffer assignment and the dry run's estimate, GiB, per row."""
    def gib(x):
        return f"{x:.2f}" if x is not None else "-"

    lines = ["| run | peak (allocator) | XLA arguments + temporaries | estimate (dry run) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r.name} | {gib(r.peak_mem_gib)} | {gib(r.xla_mem_gib)} | {gib(r.estimate_mem_gib)} |" for r in rows]
    return "\n".join(lines)


def format_breakdown(cats: dict[str, float]) -> str:
    total = sum(cats.values()) or 1.0
    return "\n".join(f"  {cat:28s} {ms:8.1f} ms  {100 * ms / total:5.1f}%" for cat, ms in cats.items())


def _jax_runners(cfg, args, batches, failures: list[str]) -> list[Runner]:
    from bitnet_jax.config import ConfigError

    out = []
    contestants = jax_contestants(cfg, args)
    if args.autodiff_matmul:
        use_autodiff_matmul()
    for overrides in contestants:
        try:
            c = variant(cfg, **overrides)
        except ConfigError as e:  # e.g. cudnn attention with float32 compute: go on without it
            failures.append(f"bitnet-jax ({', '.join(f'{k} {v}' for k, v in overrides.items())}): {e}")
            print(f"  FAILED {failures[-1]}", flush=True)
            continue
        name = contestant_name(c, args.autodiff_matmul)
        try:
            out.append(jax_runner(c, batches, args.warmup, name, alone=len(contestants) == 1))
            out[-1].info["tags"]["matmul_backward"] = "autodiff" if args.autodiff_matmul else "compute dtype"
        except Stopped:
            failures.append(f"{name}: stopped by SIGTERM while compiling or warming up")
            break
        except Exception as e:  # e.g. cuDNN attention unavailable, or out of memory: go on without it
            failures.append(f"{name}: failed to compile or warm up: {type(e).__name__}: {str(e)[:300]}")
            print(f"  {failures[-1]}", flush=True)
            continue
        print(f"  compiled {name} in {out[-1].compile_s:.1f} s", flush=True)
    return out


def _hf_runners(cfg, args, batches, failures: list[str]) -> list[Runner]:
    from bitnet_jax import train_state

    out = []
    _, state = train_state.init_state(cfg)
    for mode in (m.strip() for m in args.hf_mode.split(",")):
        try:
            out.append(hf_runner(cfg, state.params, batches, args.warmup, mode))
        except Stopped:
            failures.append(f"transformers ({mode}): stopped by SIGTERM while compiling or warming up")
            break
        except Exception as e:
            failures.append(f"transformers ({mode}): failed to build or warm up: {type(e).__name__}: {str(e)[:300]}")
            print(f"  {failures[-1]}", flush=True)
            continue
        print(f"  ready {out[-1].name} in {out[-1].compile_s:.1f} s", flush=True)
    return out


def _write_int8_hlo(path: str, runners: list[Runner]) -> None:
    parts = []
    for r in runners:
        if r.info.get("int8_dot"):
            matmuls = [m for m in int8_hlo.find_matmuls(r.live[0].as_text()) if m.forward_bitlinear]
            parts += [f"# {r.name}: {r.info['int8_dot']}", *(m.describe() for m in matmuls), ""]
    if parts:
        Path(path).write_text("\n".join(parts))


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args)
    if args.compare_hf or args.hf_only:
        # PyTorch shares the device (JAX builds the initial weights): JAX must not take 75% of a
        # GPU's memory at start.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from bitnet_jax.metrics import device_peak_flops
    from bitnet_jax.model import count_params, flops_per_token

    total_steps = args.total_steps or cfg.train.steps
    print(f"devices:  {device_summary()}")
    print(f"config:   {cfg.name}: {count_params(cfg.model) / 1e6:.2f}M parameters, batch {cfg.train.batch_size} x "
          f"{cfg.train.seq_len} = {cfg.tokens_per_step:,} tokens/step, compute {cfg.model.compute_dtype}, "
          f"grad_accum {cfg.train.grad_accum}")
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    peak = args.peak_flops or device_peak_flops()
    peak_total = peak * jax.device_count() if peak else None
    print(f"FLOPs:    {fpt / 1e6:,.1f} MFLOP/token (6N + 12 L d T); peak "
          f"{f'{peak / 1e12:,.1f} TFLOP/s per device' if peak else 'unknown (MFU omitted; pass --peak-flops)'}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    sys.stdout.flush()

    if args.dry_run:
        out = dry_run(cfg)
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0

    batches = random_batches(cfg)
    failures: list[str] = []
    _stop_on_sigterm()
    runners = [] if args.hf_only else _jax_runners(cfg, args, batches, failures)
    if args.hlo_out:
        _write_int8_hlo(args.hlo_out, runners)
    if args.compare_hf or args.hf_only:
        runners += _hf_runners(cfg, args, batches, failures)
    failures += time_in_blocks(runners, args.steps)
    for f in failures:
        print(f"  FAILED {f}", flush=True)
    rows = [r.result(cfg.tokens_per_step, fpt, peak_total) for r in runners if r.times]
    table = format_table(rows, cfg, total_steps)
    print()
    print(table)
    summary = {"ratios": ratios(rows)}
    ours = [r for r in rows if r.tags.get("framework") == "bitnet-jax"]
    theirs = [r for r in rows if r.tags.get("framework") == "transformers"]
    if ours and theirs:  # like with like: our rows of the model transformers ran (BitNet or dense)
        same = [r for r in ours if r.tags.get("model") == theirs[0].tags.get("model")] or ours
        best = max(same, key=lambda r: r.tokens_per_s)
        summary["speedup_vs_transformers"] = best.tokens_per_s / theirs[0].tokens_per_s
        print(f"\nbitnet-jax / transformers tokens/s: {summary['speedup_vs_transformers']:.2f}x "
              f"(same config, weights and batches; first losses {best.first_loss:.4f} vs {theirs[0].first_loss:.4f})")
    if summary["ratios"]:
        print("\n" + format_ratios(summary["ratios"]))
    if ours:
        print("\ndevice memory, GiB:\n" + format_memory(ours))
    for r in ours:
        if r.int8_dot:
            print(f"\nint8 products of {r.name}: {r.int8_dot}")
    profiled = None
    if args.profile and runners and runners[0].live:
        # After the table is out: a tracer that fails (no CUPTI) or a timeout loses only the profile.
        compiled, holder, device_batches = runners[0].live
        try:
            profiled = profile(compiled, holder["state"], device_batches)
        except (Stopped, Exception) as e:
            failures.append(f"profile: {type(e).__name__}: {str(e)[:300]}")
            print(f"  FAILED {failures[-1]}", flush=True)
    if profiled:
        cats, ops = profiled
        print(f"\nwhere the time goes in {runners[0].name} ({sum(cats.values()):.1f} ms of op time per step, "
              "summed over threads or streams):")
        print(format_breakdown(cats))
        print("by category:")
        print(format_breakdown(breakdown(cats)))
        print("top ops:")
        for op, ms, op_name in ops:
            print(f"  {ms:8.2f} ms  {op:30s} {op_name[-90:]}")
        summary.update(profile_ms=cats, breakdown_ms=breakdown(cats), profiled=runners[0].name)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_summary(), "device_kind": jax.devices()[0].device_kind,
                                               "jax": jax.__version__, "config": cfg.name,
                                               "tokens_per_step": cfg.tokens_per_step, "flops_per_token": fpt,
                                               "peak_flops_per_device": peak, "total_steps": total_steps,
                                               "rows": [dataclasses.asdict(r) for r in rows],
                                               "failures": failures, **summary},
                                              indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
