"""How fast status.py reads a 60,000-step run, against tensorboard's EventAccumulator.

Writes a realistic run directory with tensorboardX (9 scalars a step, eval / samples / BitNet
metrics every 1000 steps, checkpoints every 5000, a crash at step 31,234 resumed from 30,000 into a
second event file, and a half-written record at the end), then times, on the same machine and files:

- ``python status.py RUN --json`` as a subprocess (what a user waits for, Python start-up included);
- the library in-process (read every event + build the report), and a ``--watch`` refresh;
- ``EventAccumulator(size_guidance=0 for every kind)``: ``Reload()`` and every scalar tag's values;

and checks that both readers return the same (step, value) pairs for every scalar tag.

    .venv/bin/python benchmarks/bench_status.py                # ~30 s to write the log, then timings
    .venv/bin/python benchmarks/bench_status.py --run-dir /tmp/bench_run   # keep / reuse the log
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS, BATCH, SEQ = 60_000, 32, 1024
EVERY, CKPT_EVERY = 1000, 5000
CRASH_AT, RESUME_FROM = 31_234, 30_000
PROMPTS = ["The meaning of", "A function is", "In Python,"]


def _lr(step: int) -> float:
    warm, switch = 375, STEPS // 2
    if step < warm:
        return 1.5e-3 * step / warm
    peak = 1.5e-3 if step < switch else 1.0e-3
    return peak * (STEPS - step) / (STEPS - warm)


def write_run(run_dir: Path) -> None:
    from tensorboardX import SummaryWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "bitnet_95m",
        "model": {"hidden_size": 768, "num_hidden_layers": 12},
        "train": {"steps": STEPS, "batch_size": BATCH, "seq_len": SEQ, "seed": 0},
        "optim": {"peak_lr_1": 1.5e-3, "peak_lr_2": 1.0e-3, "warmup_steps": 375, "stage_switch": None},
        "checkpoint": {"every": CKPT_EVERY}, "eval": {"every": EVERY},
        "log": {"metrics_every": EVERY, "samples_every": EVERY, "prompts": PROMPTS},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rng = np.random.default_rng(0)
    wall = time.time() - STEPS * 0.08 - 3600

    def segment(first: int, last: int, suffix: str) -> None:
        nonlocal wall
        w = SummaryWriter(str(run_dir / "tb"), flush_secs=3600, max_queue=1000, filename_suffix=suffix)
        for step in range(first, last + 1):
            wall += 0.079
            loss = 2.2 + 8.0 / math.sqrt(step) + 0.05 * rng.standard_normal()
            stage = 1 if step < STEPS // 2 else 2
            for tag, value in (("train/loss", loss), ("train/lr", _lr(step)), ("train/wd", 0.1 if stage == 1 else 0.0),
                               ("train/grad_norm", 0.8 + 0.1 * rng.standard_normal()),
                               ("train/step_time_ms", 79 + rng.standard_normal()),
                               ("train/tokens_per_sec", BATCH * SEQ / 0.079), ("train/tokens_seen", step * BATCH * SEQ),
                               ("train/stage", stage), ("train/mfu", 0.47)):
                w.add_scalar(tag, value, step, walltime=wall)
            if step % EVERY == 0:
                w.add_scalar("eval/loss", loss + 0.03, step, walltime=wall)
                w.add_scalar("eval/perplexity", math.exp(loss + 0.03), step, walltime=wall)
                w.add_scalar("eval/train_eval_gap", 0.03, step, walltime=wall)
                w.add_scalar("time/eval_ms", 4200.0, step, walltime=wall)
                for i, prompt in enumerate(PROMPTS):
                    for mode in ("greedy", "typical", "stress"):
                        w.add_text(f"samples/{i}/{mode}", f"{prompt} ... {mode} text at {step}", step, walltime=wall)
                w.add_scalar("time/samples_ms", 2500.0, step, walltime=wall)
                for layer in range(12):
                    for name in ("frac_neg", "frac_zero", "frac_pos", "gamma", "flip_rate", "act_absmax"):
                        w.add_scalar(f"bitnet/layers.{layer}/{name}", rng.random(), step, walltime=wall)
                w.add_scalar("time/metrics_ms", 300.0, step, walltime=wall)
                wall += 7.0
            if step % CKPT_EVERY == 0:
                w.add_scalar("time/checkpoint_ms", 150.0, step, walltime=wall)
                (run_dir / "checkpoints" / str(step)).mkdir(parents=True, exist_ok=True)
        w.close()

    segment(1, CRASH_AT, ".0")
    segment(RESUME_FROM + 1, STEPS, ".1")
    newest = sorted((run_dir / "tb").iterdir())[-1]
    with open(newest, "ab") as f:  # a record the writer had only begun to append
        f.write((100).to_bytes(8, "little") + b"\0\0\0\0" + b"\x09partial")


def time_status_cli(run_dir: Path, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of the CLI as a subprocess."""
    times, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "status.py"), str(run_dir), "--json"], check=True,
                       stdout=subprocess.DEVNULL, cwd=REPO)
        times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(times), statistics.median(cpus)


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t, time.process_time() - c


def read_with_status(run_dir: Path):
    from bitnet_jax.status import Run, build_status

    run = Run(run_dir)
    run.refresh()
    build_status(run)
    return run


def read_with_event_accumulator(run_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir / "tb"), size_guidance=dict(ea.STORE_EVERYTHING_SIZE_GUIDANCE))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, help="write the log here (or reuse it if present)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tmp = None
    run_dir = args.run_dir
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_status_")
        run_dir = Path(tmp.name) / "bitnet_95m_T1.97B_1732700000"
    if not (run_dir / "tb").is_dir():
        t = time.perf_counter()
        write_run(run_dir)
        print(f"wrote {run_dir} in {time.perf_counter() - t:.1f} s")
    size = sum(f.stat().st_size for f in (run_dir / "tb").iterdir())

    cli, cli_cpu = time_status_cli(run_dir, args.repeats)
    libs = [timed(read_with_status, run_dir) for _ in range(args.repeats)]
    run = libs[-1][0]
    lib, lib_cpu = (statistics.median(x[i] for x in libs) for i in (1, 2))
    from bitnet_jax.status import build_status

    _, refresh, refresh_cpu = timed(lambda: (run.refresh(), build_status(run)))
    _, ea_import, ea_import_cpu = timed(lambda: __import__("tensorboard.backend.event_processing.event_accumulator"))
    eas = [timed(read_with_event_accumulator, run_dir) for _ in range(max(1, args.repeats - 1))]
    ea = eas[-1][0]
    ea_time, ea_cpu = (statistics.median(x[i] for x in eas) for i in (1, 2))

    # EventAccumulator keeps both values of a step logged twice (the restart's overlap, in load
    # order: oldest file first); status keeps the newest. Compare against the newest of each step.
    mismatches = []
    for tag, events in ea.items():
        ours = run.log.scalars(tag)
        newest = {e.step: e.value for e in events}
        steps = np.array(sorted(newest))
        values = np.array([newest[s] for s in steps])
        if ours is None or not (np.array_equal(ours.steps, steps) and np.array_equal(ours.values, values)):
            mismatches.append(tag)
    extra = sorted(set(run.log.tags()) - set(ea))
    n_scalars = sum(len(v) for v in ea.values())
    n_ours = sum(len(run.log.scalars(t)) for t in run.log.tags())

    print(f"\nlog: {len(run.log.files)} event files, {size / 2**20:.1f} MiB, {run.log.records:,} records, "
          f"{n_scalars:,} scalars in {len(ea)} tags")
    rows = [
        ("status.py RUN --json (subprocess, incl. Python start-up)", cli, cli_cpu),
        ("bitnet_jax.status in-process: read all + report", lib, lib_cpu),
        ("bitnet_jax.status --watch refresh, no new bytes", refresh, refresh_cpu),
        ("EventAccumulator(size_guidance=0): Reload + Scalars", ea_time, ea_cpu),
        ("  (import of tensorboard's event_accumulator, once)", ea_import, ea_import_cpu),
    ]
    width = max(len(r[0]) for r in rows)
    load = os.getloadavg()[0]
    print(f"{'reader':<{width}}  {'wall s':>8}  {'CPU s':>8}   (load average {load:.1f} on {os.cpu_count()} cores)")
    for name, secs, cpu in rows:
        print(f"{name:<{width}}  {secs:8.3f}  {cpu:8.3f}")
    print(f"speed-up of status.py (subprocess) over EventAccumulator: {ea_time / cli:.1f}x wall, "
          f"{ea_cpu / cli_cpu:.1f}x CPU")
    verdict = "yes" if not mismatches and not extra else f"NO: {mismatches} {extra}"
    print(f"(step, value) pairs identical to EventAccumulator's, newest per step, for all {len(ea)} tags "
          f"({n_ours:,} after merging the restart): {verdict}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
