"""What the instrumentation costs against the bare train loop, on the tiny config.

Built from the same pieces as ``bitnet_jax/train.py``, on one train state, in one process:

- per-step work, in interleaved blocks of K steps (bare, instrumented, bare, ...) so load drift on
  a shared machine hits both alike; each block ends by waiting for the device:
    bare:          next(loader) -> global_batch -> train_step
    instrumented:  + the debug-poison check, the anomaly detector's batch memory, StepMetrics.push
                   (the one-step-behind fetch) and the per-step hooks on it (9 TensorBoard scalars,
                   the anomaly check, the console) and the state hooks' due checks
- periodic work: each hook called after a warm-up call (compilation excluded), median of a few calls,
  amortised by its interval: eval, BitNet metrics, samples, and the blocking part of an async
  checkpoint save.

The per-step host work of the instrumentation is also timed directly (excluding the wait for the
device, which the bare loop has too): on a busy shared CPU the block difference is mostly noise.
Overhead = (per-step host work + sum(hook ms / every)) / bare ms/step, at the config's own intervals
and at every = 1000 steps (the 95M run's eval / metrics / samples interval), checkpoints every 5000.

    .venv/bin/python benchmarks/bench_instrumentation.py                  # tiny config, ~2-4 min on CPU
    .venv/bin/python benchmarks/bench_instrumentation.py --rounds 8 --block 40 --set train.batch_size=8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=6, help="bare/instrumented block pairs (default 6)")
    p.add_argument("--block", type=int, default=25, help="steps per block (default 25)")
    p.add_argument("--hook-calls", type=int, default=3, help="timed calls per hook after warm-up (default 3)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import jax

    from bitnet_jax import config as config_lib, sharding, train_state
    from bitnet_jax.anomaly import AnomalyDetector, poison_if_due
    from bitnet_jax.bitnet_metrics import BitNetMetrics
    from bitnet_jax.checkpoint import CheckpointManager
    from bitnet_jax.data import build_eval_batches, build_train_loader, load_tokenizer
    from bitnet_jax.evaluation import Evaluator
    from bitnet_jax.console import Console
    from bitnet_jax.hooks import Hook, StepInfo, run_hooks
    from bitnet_jax.metrics import StepMetrics, TensorBoard, device_peak_flops, train_scalars_hook
    from bitnet_jax.model import count_params, flops_per_token
    from bitnet_jax.samples import Sampler

    cfg = config_lib.load(args.config, args.overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_instr_"))
    tokenizer = load_tokenizer(cfg.tokenizer)
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, state = train_state.init_state(cfg)
    state, state_sharding = train_state.place_state(state, mesh)
    train_step = train_state.make_train_step(cfg, graphdef, mesh, state_sharding)
    eval_step = train_state.make_eval_step(graphdef, mesh, state_sharding.params)
    loader = build_train_loader(cfg, tokenizer)
    evaluator = Evaluator(eval_step, build_eval_batches(cfg, tokenizer), mesh)

    tb = TensorBoard(run_dir / "tb")
    console = Console(total_steps=10**9, start_step=0, print_every=0, bar=sys.stderr.isatty())
    peak = cfg.log.peak_flops or device_peak_flops()
    metrics = StepMetrics(tokens_per_step=cfg.tokens_per_step,
                          flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
                          peak_flops_total=peak * jax.device_count() if peak else None)
    anomalies = AnomalyDetector(cfg, run_dir, tb, tokenizer, warn=console.warn)
    per_step_hooks = [train_scalars_hook(tb), Hook("anomaly", lambda i: anomalies.on_step_metrics(i.step, i.metrics)),
                      console.hook()]
    bitnet = BitNetMetrics(graphdef, evaluator.batches[0])
    sampler = Sampler(cfg, tokenizer, graphdef, run_dir, tb)
    ckpt = CheckpointManager(run_dir, cfg)
    step = 0
    intervals = {"eval": cfg.eval.every, "bitnet metrics": cfg.log.metrics_every,
                 "samples": cfg.log.samples_every, "checkpoint (blocking part)": cfg.checkpoint.every}

    due_checks = [Hook(name, lambda info: None, every=every, needs_state=True) for name, every in intervals.items()]

    def bare(k: int) -> None:
        nonlocal state, step
        for _ in range(k):
            state, _ = train_step(state, sharding.global_batch(next(loader), mesh))
            step += 1

    host_ms: list[float] = []  # host time of the instrumentation calls alone, per step

    def instrumented(k: int) -> None:
        nonlocal state, step
        for _ in range(k):
            rows = next(loader)
            t0 = time.perf_counter()
            rows = poison_if_due(rows, step + 1, cfg.train.debug_poison_step, cfg.model.vocab_size)
            anomalies.remember_batch(step + 1, rows)
            spent = time.perf_counter() - t0
            state, device_metrics = train_step(state, sharding.global_batch(rows, mesh))
            step += 1
            if metrics._pending is not None:  # wait for the previous step outside the timing: the
                jax.block_until_ready(metrics._pending[1])  # device is busy then, the host is not working
            t0 = time.perf_counter()
            for done, host in metrics.push(step, device_metrics):
                run_hooks(per_step_hooks, StepInfo(done, host))
            [h for h in due_checks if h.due(step)]  # the loop asks every step; here they are run below instead
            host_ms.append((spent + time.perf_counter() - t0) * 1e3)
        for done, host in metrics.flush():
            run_hooks(per_step_hooks, StepInfo(done, host))

    def timed_block(fn, k: int) -> float:
        jax.block_until_ready(state)
        start = time.perf_counter()
        fn(k)
        jax.block_until_ready(state)
        return (time.perf_counter() - start) * 1e3 / k

    hooks = {
        "eval": lambda: evaluator(state.params),
        "bitnet metrics": lambda: tb.scalars(step, bitnet(state.params)),
        "samples": lambda: anomalies.check_samples(step, sampler(step, state.params)),
        "checkpoint (blocking part)": lambda: ckpt.save(step, state, data_state=loader.state_dict(),
                                                        resumables={"anomaly": anomalies}),
    }
    print(f"config {cfg.name}: {count_params(cfg.model):,} parameters, batch {cfg.train.batch_size} x "
          f"{cfg.train.seq_len}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"{args.rounds} rounds of {args.block} + {args.block} steps", flush=True)
    try:
        metrics.start_clock()
        bare(3), instrumented(3)  # compile the step; warm the loader
        hook_ms: dict[str, list[float]] = {name: [] for name in hooks}
        for name, fn in hooks.items():  # warm-up call: compiles generation / metrics, first save
            fn()
            ckpt.wait()
        bare_ms, instr_ms = [], []
        for r in range(args.rounds):
            bare_ms.append(timed_block(bare, args.block))
            instr_ms.append(timed_block(instrumented, args.block))
            if r < args.hook_calls:
                for name, fn in hooks.items():
                    jax.block_until_ready(state)
                    start = time.perf_counter()
                    fn()
                    hook_ms[name].append((time.perf_counter() - start) * 1e3)
                    ckpt.wait()  # the background write finishes outside the timed blocks
    finally:
        ckpt.close()
        loader.close()
        tb.close()
        console.close()

    base, per_step = statistics.median(bare_ms), statistics.median(instr_ms)
    print()
    print(f"{'':34}{'ms/step':>10}")
    print(f"{'bare loop':34}{base:10.2f}   (blocks: {', '.join(f'{x:.1f}' for x in bare_ms)})")
    print(f"{'instrumented, per-step work':34}{per_step:10.2f}   (blocks: {', '.join(f'{x:.1f}' for x in instr_ms)})")
    print(f"{'per-step overhead (difference)':34}{per_step - base:10.2f}   {100 * (per_step - base) / base:+.2f}%"
          "   (within the blocks' noise on a shared CPU)")
    host = statistics.fmean(host_ms)  # the mean, stalls included: what the steps pay in total
    print(f"{'host work of the instrumentation':34}{host:10.3f}   {100 * host / base:+.2f}%   (timed directly: "
          f"poison check, batch memory, fetch + 9 TB scalars + anomaly check + console, due checks; "
          f"mean; median {statistics.median(host_ms):.3f})")
    print()
    print(f"{'periodic work':34}{'ms/call':>10}{'every':>8}{'ms/step':>10}{'% of bare':>11}"
          f"{'@1000: ms/step':>16}{'%':>8}")
    amortised, amortised_1000 = 0.0, 0.0
    for name, times in hook_ms.items():
        ms = statistics.median(times)
        every = intervals[name]
        per = ms / every if every else 0.0
        per_1000 = ms / (5000 if name.startswith("checkpoint") else 1000)
        amortised += per
        amortised_1000 += per_1000
        print(f"{name:34}{ms:10.1f}{every:8d}{per:10.3f}{100 * per / base:10.2f}%"
              f"{per_1000:16.4f}{100 * per_1000 / base:7.2f}%")
    print()
    # Per-step part: the directly timed host work (the block difference is dominated by noise here).
    total = (host + amortised) / base
    total_1000 = (host + amortised_1000) / base
    print(f"total overhead at the config's intervals: {100 * total:+.2f}%")
    print(f"total overhead at eval/metrics/samples every 1000, checkpoint every 5000 (the 95M run): "
          f"{100 * total_1000:+.2f}%   (goal: under 3%)")
    print(f"(run files in {run_dir})")


if __name__ == "__main__":
    main()
