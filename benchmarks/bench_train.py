"""Training throughput of the jitted train step: tokens/s, step time and MFU, optionally against
transformers' PyTorch ``BitNetForCausalLM`` on the same configuration, weights and batches.

Each contestant (our step per ``--attention`` value, transformers' model with ``--compare-hf``) is
compiled (timed apart) and warmed up; then ``--steps`` steps are timed one by one (each waited for),
in two blocks per contestant taken in turn (A B B A) so that a shared machine's changing load hits
all alike, and the median is reported. Batches are random token ids (no tokenizer, no dataset), so the script needs
only jax, flax, optax, numpy and PyYAML (plus torch and transformers for ``--compare-hf``).

    .venv/bin/python benchmarks/bench_train.py --config configs/tiny.yaml --compare-hf
    .venv/bin/python benchmarks/bench_train.py --config configs/bitnet_95m.yaml --attention xla,cudnn
    .venv/bin/python benchmarks/bench_train.py --config configs/tiny.yaml --profile      # where time goes
    .venv/bin/python benchmarks/bench_train.py --config configs/bitnet_95m.yaml --dry-run  # compile only

MFU = tokens/s x FLOPs/token / (peak FLOP/s per device x devices), FLOPs/token = 6 N + 12 L d T
(PaLM appendix B; N all parameters with the tied embedding counted once, as the LM-head matmul).
Peak: ``--peak-flops`` or the device kind's dense bf16 peak (H100/H200 989 TFLOP/s); none on CPU
unless given.
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/tiny.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--attention", help="comma list of model.attention values to measure (default: the config's)")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' PyTorch BitNet")
    p.add_argument("--hf-only", action="store_true", help="time only the PyTorch model")
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


def with_attention(cfg, attention: str):
    from bitnet_jax import config as config_lib

    data = cfg.to_dict()
    data["model"]["attention"] = attention
    return config_lib.from_dict(data)


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


@dataclasses.dataclass
class Runner:
    """One contestant: ``step(i)`` runs training step i to completion (waited for)."""

    name: str
    step: Callable[[int], None]
    compile_s: float
    first_loss: float
    live: tuple = ()  # (compiled, state holder, batches) for --profile
    times: list = dataclasses.field(default_factory=list)

    def result(self, tokens: int, flops_per_token: float, peak_total: float | None) -> Result:
        med = statistics.median(self.times)
        tps = tokens / med
        return Result(self.name, med * 1e3, tps, self.compile_s, self.first_loss,
                      tps * flops_per_token / peak_total if peak_total else None, min(self.times) * 1e3,
                      len(self.times))


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


def jax_runner(cfg, batches: np.ndarray, warmup: int, name: str) -> Runner:
    """Compiles (timed) and warms up our train step; the state lives in the returned closure."""
    import jax

    from bitnet_jax import sharding

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
    return Runner(name, one, compile_s, float(first["loss"]), live=(compiled, holder, device_batches))


# --------------------------------------------------------------------------- theirs (PyTorch)

def hf_model(cfg, params):
    """transformers' BitNetForCausalLM with online autobitlinear quantization and our weights."""
    from bitnet_jax.hf import torch_reference_model

    return torch_reference_model(cfg.model, params)


def hf_runner(cfg, params, batches: np.ndarray, warmup: int) -> Runner:
    """Forward, float32 cross-entropy, backward, global-norm clipping and AdamW: one optimizer step of
    transformers' model, as ours does (same weights, batches, optimizer settings)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.model.compute_dtype == "bfloat16" and device == "cuda" else torch.float32
    model = hf_model(cfg, params).to(device=device, dtype=dtype).train()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.peak_lr_1, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    data = [torch.from_numpy(b.astype(np.int64)).to(device) for b in batches]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = {}

    def one(i: int) -> None:
        batch = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sync()
        first.setdefault("loss", loss.detach().item())

    t0 = time.perf_counter()
    one(0)  # includes torch.compile of transformers' quantizers
    compile_s = time.perf_counter() - t0
    for i in range(1, warmup):
        one(i)
    return Runner(f"transformers BitNet (torch {torch.__version__}, {device})", one, compile_s, first["loss"])


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
    scope (see model.py), forward or backward; the optimizer update is outside the differentiated part."""
    found = [(m.start(), s) for s in SCOPES for m in re.finditer(rf"\b{s}\b", op_name)]
    part = max(found)[1] if found else ("optimizer" if "jvp" not in op_name and "transpose" not in op_name
                                        else "other")
    direction = "bwd" if "transpose(" in op_name else "fwd"
    return f"{part} ({direction})" if part != "optimizer" else part


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
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if ev.name in names or plane.name.startswith("/device:"):
                    per_op[ev.name] += ev.duration_ns / 1e6 / steps
    cats = collections.Counter()
    for op, ms in per_op.items():
        cats[_category(names.get(op, ""))] += ms
    ops = [(op, ms, names.get(op, "?")) for op, ms in per_op.most_common(top)]
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
    lines = [f"| run | step ms (median) | tokens/s | MFU | compile s | first loss | {total_steps:,} steps |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        hours = r.step_ms / 1e3 * total_steps / 3600
        lines.append(f"| {r.name} | {r.step_ms:.1f} | {r.tokens_per_s:,.0f} | {mfu} | {r.compile_s:.1f} | "
                     f"{r.first_loss:.4f} | {hours:.2f} h |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args)
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
    runners: list[Runner] = []
    failures: list[str] = []
    _stop_on_sigterm()
    if not args.hf_only:
        for attention in (args.attention.split(",") if args.attention else [cfg.model.attention]):
            name = f"bitnet-jax (attention {attention.strip()})"
            try:
                runners.append(jax_runner(with_attention(cfg, attention.strip()), batches, args.warmup, name))
            except Stopped:
                failures.append(f"{name}: stopped by SIGTERM while compiling or warming up")
                break
            except Exception as e:  # e.g. cuDNN attention unavailable, or out of memory: go on without it
                failures.append(f"{name}: failed to compile or warm up: {type(e).__name__}: {str(e)[:300]}")
                print(f"  {failures[-1]}", flush=True)
                continue
            print(f"  compiled {name} in {runners[-1].compile_s:.1f} s", flush=True)
    if args.compare_hf or args.hf_only:
        from bitnet_jax import train_state

        _, state = train_state.init_state(cfg)
        runners.append(hf_runner(cfg, state.params, batches, args.warmup))
        print(f"  ready {runners[-1].name} in {runners[-1].compile_s:.1f} s", flush=True)
    failures += time_in_blocks(runners, args.steps)
    for f in failures:
        print(f"  FAILED {f}", flush=True)
    rows = [r.result(cfg.tokens_per_step, fpt, peak_total) for r in runners if r.times]
    table = format_table(rows, cfg, total_steps)
    print()
    print(table)
    ours = [r for r in rows if r.name.startswith("bitnet-jax")]
    theirs = [r for r in rows if not r.name.startswith("bitnet-jax")]
    summary = {}
    if ours and theirs:
        best = max(ours, key=lambda r: r.tokens_per_s)
        summary["speedup_vs_transformers"] = best.tokens_per_s / theirs[0].tokens_per_s
        print(f"\nbitnet-jax / transformers tokens/s: {summary['speedup_vs_transformers']:.2f}x "
              f"(same config, weights and batches; first losses {best.first_loss:.4f} vs {theirs[0].first_loss:.4f})")
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
        total = sum(cats.values())
        print(f"\nwhere the time goes ({total:.1f} ms of op time per step, summed over threads):")
        for cat, ms in cats.items():
            print(f"  {cat:28s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
        print("top ops:")
        for op, ms, op_name in ops:
            print(f"  {ms:8.2f} ms  {op:30s} {op_name[-90:]}")
        summary["profile_ms"] = cats
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_summary(), "config": cfg.name,
                                               "tokens_per_step": cfg.tokens_per_step, "flops_per_token": fpt,
                                               "peak_flops_per_device": peak, "total_steps": total_steps,
                                               "rows": [dataclasses.asdict(r) for r in rows],
                                               "failures": failures, **summary},
                                              indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
