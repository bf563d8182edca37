"""How long one asynchronous checkpoint save blocks the train loop, for the full train state.

    python benchmarks/bench_checkpoint.py                       # the 95M state (params + Adam), 3 saves
    python benchmarks/bench_checkpoint.py --step-time           # also time train steps (the goal: a save
                                                                # blocks no longer than one step)
    python benchmarks/bench_checkpoint.py --config configs/tiny.yaml --saves 5

For each save it prints: the time ``CheckpointManager.save`` held the loop (device-to-host copy and
Orbax bookkeeping), the time until the step was on disk (``wait``, nothing else running), the
state's size in memory and on disk. With ``--step-time`` it also times train steps on random tokens (compiled first), alone and
while the previous save is still being written, to show what the background write costs the loop.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "bitnet_95m.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--step-time", action="store_true", help="also time train steps (slow on CPU for 95M)")
    p.add_argument("--dir", help="where to write (default: a temporary folder, removed at the end)")
    args = p.parse_args()

    import jax
    import numpy as np

    from bitnet_jax import config as config_lib
    from bitnet_jax import sharding, train_state
    from bitnet_jax.checkpoint import CheckpointManager

    cfg = config_lib.load(args.config, args.overrides + ["checkpoint.every=1", "checkpoint.keep_last=1"])
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, state = train_state.init_state(cfg)
    state, shardings = train_state.place_state(state, mesh)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))

    step_fn, batch = None, None
    if args.step_time:
        step_fn = train_state.make_train_step(cfg, graphdef, mesh, shardings)
        rows = np.random.default_rng(0).integers(0, cfg.model.vocab_size,
                                                 (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
        batch = sharding.global_batch(rows, mesh)
        state, m = step_fn(state, batch)  # compile
        jax.block_until_ready(m)

    def timed_steps(n: int) -> list[float]:
        nonlocal state
        out = []
        for _ in range(n):
            t = time.perf_counter()
            state, m = step_fn(state, batch)
            jax.block_until_ready(m["loss"])
            out.append((time.perf_counter() - t) * 1e3)
        return out

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    mngr = CheckpointManager(root, cfg)
    rows_out = []
    alone_ms, during_ms = [], []
    try:
        if step_fn:
            alone_ms = timed_steps(5)
        for i in range(1, args.saves + 1):
            jax.block_until_ready(state)  # the state a real loop would save is the one just computed
            t0 = time.perf_counter()
            mngr.save(i, state, data_state={"bench": i}, resumables={})
            t1 = time.perf_counter()
            mngr.wait()
            t2 = time.perf_counter()
            rows_out.append((i, (t1 - t0) * 1e3, (t2 - t0) * 1e3, dir_bytes(root / "checkpoints" / str(i))))
        if step_fn:  # one more save, with train steps running while it is written
            jax.block_until_ready(state)
            mngr.save(args.saves + 1, state, data_state={}, resumables={})
            during_ms = timed_steps(3)
            mngr.wait()
    finally:
        mngr.close()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print(f"config {cfg.name}: {n_params:,} parameters; train state (params + Adam moments + step + key) "
          f"{state_bytes / 2**20:,.1f} MiB in memory; device: {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), {jax.device_count()} device(s)")
    print(f"{'save':>4} | {'blocking ms':>11} | {'total save ms':>13} | {'state MiB':>9} | {'on disk MiB':>11}")
    print("-" * 62)
    for i, block, total, disk in rows_out:
        print(f"{i:>4} | {block:>11.1f} | {total:>13.1f} | {state_bytes / 2**20:>9.1f} | {disk / 2**20:>11.1f}")
    blocks = [r[1] for r in rows_out]
    print(f"median blocking: {statistics.median(blocks):.1f} ms "
          f"(first save includes Orbax's one-time setup)")
    if step_fn:
        step = statistics.median(alone_ms)
        print(f"train step ({cfg.train.batch_size} x {cfg.train.seq_len} tokens): median {step:.1f} ms alone, "
              f"{statistics.median(during_ms):.1f} ms while a save is written; "
              f"blocking / step time = {statistics.median(blocks) / step:.2f}")


if __name__ == "__main__":
    main()
