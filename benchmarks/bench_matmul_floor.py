"""The matmul floor of one train step: every matrix multiply the step does (forward, input gradient,
weight gradient), each timed alone in XLA and in PyTorch on this machine, summed per class.

A step cannot run faster than its matmuls, so the sum bounds what any amount of work on the rest of
the step (quantizers, norms, softmax, optimizer) can win, and the two columns say how much of a
speed ratio against transformers comes from the matmul libraries themselves (XLA's YNNPACK and
PyTorch's oneDNN/MKL on CPU) rather than from the model code.

    .venv/bin/python benchmarks/bench_matmul_floor.py --config benchmarks/configs/cpu_25m.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def step_matmuls(cfg) -> list[tuple[str, int, tuple[int, int, int, int]]]:
    """``(class, count per step, (batch, m, k, n))``: ``count`` products ``[batch, m, k] @ [batch, k, n]``.

    Each linear ``[tokens, in] @ [in, out]`` costs three products per step: the forward, the input
    gradient ``dy @ W^T`` and the weight gradient ``x^T @ dy``; attention two per layer forward and
    four backward, per (batch x head)."""
    m, t = cfg.model, cfg.train
    tokens, d, f, v, h = t.batch_size * t.seq_len, m.hidden_size, m.intermediate_size, m.vocab_size, m.head_dim
    layers, heads, kv_dim = m.num_hidden_layers, m.num_attention_heads, m.kv_heads * h
    out = []

    def linear(name, count, d_in, d_out):
        out.append((name, count, (1, tokens, d_in, d_out)))   # forward
        out.append((name, count, (1, tokens, d_out, d_in)))   # input gradient
        out.append((name, count, (1, d_in, tokens, d_out)))   # weight gradient

    linear("bitlinear", layers, d, heads * h)      # q
    linear("bitlinear", layers, heads * h, d)      # o
    linear("bitlinear", 2 * layers, d, kv_dim)     # k, v
    linear("bitlinear", 2 * layers, d, f)          # gate, up
    linear("bitlinear", layers, f, d)              # down
    linear("lm_head", 1, d, v)
    bh, s = t.batch_size * heads, t.seq_len
    out.append(("attention", 3 * layers, (bh, s, h, s)))   # q k^T forward; dq, dk backward
    out.append(("attention", 3 * layers, (bh, s, s, h)))   # p v forward; dv, dp backward
    return out


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _operand_shapes(shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """2-D operands for an unbatched product (batch 1): the plain matmul path of both libraries."""
    b, m, k, n = shape
    return ((m, k), (k, n)) if b == 1 else ((b, m, k), (b, k, n))


def time_xla(shape, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    from bitnet_jax import compile_options

    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in _operand_shapes(shape))
    matmul = jax.jit(jnp.matmul, compiler_options=compile_options.for_backend())
    return _median_time(lambda: matmul(x, w).block_until_ready(), repeats)


def time_torch(shape, repeats: int) -> float:
    import torch

    x, w = (torch.randn(*s) for s in _operand_shapes(shape))
    return _median_time(lambda: torch.matmul(x, w), repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "benchmarks/configs/cpu_25m.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per shape (median)")
    p.add_argument("--no-torch", action="store_true", help="time XLA only")
    args = p.parse_args(argv)

    from bitnet_jax import config as config_lib

    cfg = config_lib.load(args.config, args.overrides)
    rows: dict[str, list[float]] = {}
    for name, count, shape in step_matmuls(cfg):
        b, m, k, n = shape
        ms_xla = time_xla(shape, args.repeats) * count * 1e3
        ms_torch = 0.0 if args.no_torch else time_torch(shape, args.repeats) * count * 1e3
        row = rows.setdefault(name, [0.0, 0.0, 0.0])
        row[0] += 2 * b * m * k * n * count / 1e9
        row[1] += ms_xla
        row[2] += ms_torch

    print(f"config {cfg.name}: {cfg.train.batch_size} x {cfg.train.seq_len} tokens per step, float32")
    print()
    print("| matmuls | GFLOP/step | XLA ms | XLA GFLOP/s | PyTorch ms | PyTorch GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    total = [sum(r[i] for r in rows.values()) for i in range(3)]
    for name, (gflop, ms_xla, ms_torch) in [*rows.items(), ("all", total)]:
        torch_cells = ("-", "-") if args.no_torch else (f"{ms_torch:.0f}", f"{gflop / ms_torch * 1e3:.0f}")
        print(f"| {name} | {gflop:.1f} | {ms_xla:.0f} | {gflop / ms_xla * 1e3:.0f} | {torch_cells[0]} | {torch_cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
