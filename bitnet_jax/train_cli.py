"""train.py's command line: arguments, the start (lock, run folder, resume plan), the dry run, the
summary, how a session ended (end.json) and the exit code.

``python train.py --config configs/tiny.yaml [--set k=v]... [--run-id ID] [--runs-dir DIR] [--dry-run] [--no-eval]``
``python train.py --resume latest|STEP|RUN_DIR|RUN_DIR/checkpoints/STEP [--run-id ID] [--stop-at STEP]``
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

from bitnet_jax import config as config_lib
from bitnet_jax import distributed
from bitnet_jax import resume as resume_lib
from bitnet_jax.config import Config, ConfigError
from bitnet_jax.run_dir import RunPaths
from bitnet_jax.run_start import NewRunFolder, discard_failed_start, make_run_folder, prepare_run_dir
from bitnet_jax.run_lock import RunLock, RunLocked
from bitnet_jax.train import read_inputs, train
from bitnet_jax.units import format_count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train a BitNet b1.58 language model.")
    p.add_argument("--config", help="YAML config file (see configs/); optional with --resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; repeatable; values are YAML scalars")
    p.add_argument("--run-id", help="run folder name (default: <name>_T<tokens>_<unix time>)")
    p.add_argument("--runs-dir", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model abstractly, print its size and cost, and exit")
    p.add_argument("--resume", metavar="latest|STEP|RUN_DIR|RUN_DIR/checkpoints/STEP",
                   help="continue a run: latest or STEP of --run-id, or a run directory; a step directory "
                        "starts a new run from it (see bitnet_jax/resume.py)")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="train up to STEP, save it and exit 0; the schedule stays that of train.steps")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (eval.every)")
    g = p.add_argument_group("several processes (hosts); see bitnet_jax/distributed.py")
    g.add_argument("--coordinator", metavar="HOST:PORT|auto",
                   help="process 0's address (env JAX_COORDINATOR_ADDRESS); auto: detect SLURM/MPI/k8s")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    return p.parse_args(argv)


def default_run_id(cfg: Config, stamp: int | None = None) -> str:
    return f"{cfg.name}_T{format_count(cfg.total_tokens)}_{int(time.time()) if stamp is None else stamp}"


def dry_run(cfg: Config) -> None:
    import jax

    from bitnet_jax.memory import GIB, estimate_bytes
    from bitnet_jax.model import attention_implementation, count_params, flops_per_token
    from bitnet_jax.train_state import abstract_state

    _, state = abstract_state(cfg)  # builds the model abstractly: no allocation, no data
    n = sum(x.size for x in jax.tree.leaves(state.params))
    assert n == count_params(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    mem = estimate_bytes(cfg)
    print(f"config:            {cfg.name}")
    print(f"parameters:        {n:,} ({format_count(n)})")
    print(f"FLOPs per token:   {fpt / 1e6:,.1f} MFLOP (6N + 12 L d T)")
    print(f"tokens per step:   {cfg.tokens_per_step:,} ({cfg.train.batch_size} x {cfg.train.seq_len})")
    print(f"total tokens:      {cfg.total_tokens:,} ({format_count(cfg.total_tokens)}) over {cfg.train.steps:,} steps")
    print(f"total compute:     {fpt * cfg.total_tokens:.3g} FLOPs")
    print(f"stage switch:      step {cfg.stage_switch:,}")
    m = cfg.model
    attention = attention_implementation(m.attention, m.compute_dtype)
    print(f"device memory:     ~{mem['total'] / GIB:.2f} GiB (estimate, {attention} attention on "
          f"{jax.default_backend()}): state {mem['state'] / GIB:.2f} + weight copies {mem['weights'] / GIB:.2f} "
          f"+ activations {mem['activations'] / GIB:.2f} (attention {mem['attention'] / GIB:.2f}) "
          f"+ logits {mem['logits'] / GIB:.2f} GiB")
    if m.attention == "auto" and attention_implementation("auto", m.compute_dtype, "gpu") != attention:
        print(f"                   ~{estimate_bytes(cfg, 'gpu')['total'] / GIB:.2f} GiB on a GPU "
              "(model.attention auto runs cuDNN there, which keeps no attention matrices)")


def print_summary(paths: RunPaths, summary: dict) -> None:
    from bitnet_jax.console import command

    first, last = summary.get("first"), summary.get("final_loss")
    print()
    if first is not None and last is not None:
        drop = 100.0 * (1 - last / first[1])
        print(f"train loss: {first[1]:.4f} (step {first[0]}) -> {last:.4f} (step {summary['step']}), "
              f"{drop:.1f}% lower")
    skipped = summary.get("skipped") or 0  # always said: a run that skipped updates must not look clean
    print(f"skipped updates: {skipped}" + (f" (non-finite loss or gradients; see {paths.root / 'anomalies'})"
                                           if skipped else ""))
    if summary.get("eval_loss") is not None:
        print(f"eval loss:  {summary['eval_loss']:.4f} (perplexity {math.exp(summary['eval_loss']):.1f})")
    if summary.get("median_step_ms"):
        tps = summary["tokens_per_step"] / (summary["median_step_ms"] / 1e3)
        print(f"speed:      {summary['median_step_ms']:.1f} ms/step, {tps:,.0f} tokens/s (median)")
    print(f"run directory: {paths.root}")
    print(f"watch it:      {command('tensorboard', '--logdir', paths.tb)}   or   "
          f"{command('python', 'status.py', paths.root)}")
    if summary.get("halted"):
        print(f"halted: {summary['halted']}; nothing after the last good step was "
              f"saved; see {paths.root / 'anomalies'}")
    elif summary.get("stopped_by"):
        took = f" in {summary['stop_seconds']:.1f} s" if summary.get("stop_seconds") is not None else ""
        print(f"stopped by {summary['stopped_by']} at step {summary['step']} of {summary['total_steps']}: "
              f"saved checkpoints/{summary['step']}{took} (it is on disk: safe to kill)")
        if summary.get("data_ran_out"):
            more = command("python", "train.py", "--resume", paths.root / "checkpoints" / str(summary["step"]),
                           "--run-id", "NEW_ID", "--set", "data.data_files=...")
            print(f"to train on, start a new run from it with more data (its stream starts afresh): {more} "
                  "(or --set data.repeat=true)")
        else:
            print(f"resume with:   {command('python', 'train.py', '--resume', paths.root)}")


def end_of(summary: dict) -> tuple[str, str, int]:
    """``(state, reason, exit code)`` of a run that returned: what end.json records."""
    if summary.get("halted"):
        return "halted", summary["halted"], 3
    if summary.get("stopped_by"):
        return "stopped", f"stopped by {summary['stopped_by']}", 0
    return "finished", f"train.steps = {summary['total_steps']} reached", 0


def record_end(paths: RunPaths | None, state: str, step: int | None, reason: str, exit_code: int) -> None:
    """Writes RUN_DIR/end.json for status.py (process 0 only). Never raises: a full disk must not
    replace the message that explains the exit."""
    jax = sys.modules.get("jax")
    if paths is None or (jax is not None and jax.process_index() != 0):
        return
    from bitnet_jax.end_record import write_end_record

    try:
        write_end_record(paths.root, state, step, reason.splitlines()[0][:300] if reason else "", exit_code)
    except OSError:
        pass


def lock_run(run_dir: Path, group) -> RunLock | None:
    """Process 0 takes the run directory's lock (run_lock.py) before anything is written there; with
    several processes every process learns whether it could (a collective) and all refuse together."""
    lock, refused = None, None
    first = group is None or __import__("jax").process_index() == 0
    if first:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLocked as e:
            refused = e
    if group is not None and not distributed.broadcast_from_first(int(refused is None)):
        raise refused or RunLocked(f"process 0 could not take the lock of {run_dir} (see its output)")
    if refused:
        raise refused
    if lock and lock.note():
        print(f"note: {lock.note()}; taking it over", file=sys.stderr)
    return lock


def interrupted_message(paths: RunPaths | None, what: str = "a second Ctrl-C") -> str:
    """What an interrupt (``what``) leaves: the step in progress is not saved; where to go on from."""
    from bitnet_jax.console import command
    from bitnet_jax.run_dir import complete_steps

    steps = complete_steps(paths.root) if paths and paths.checkpoints.is_dir() else []
    if not steps:
        return f"interrupted ({what}): stopped without saving; this run has no checkpoint yet"
    return (f"interrupted ({what}): stopped without saving the current step; the newest checkpoint "
            f"is step {steps[-1]}: resume with {command('python', 'train.py', '--resume', paths.root)}")


def end_at_once(paths: RunPaths, lock: RunLock | None) -> None:
    """A second Ctrl-C during training: say so, record it and release the run, then end the process
    without waiting for anything (a save in flight is abandoned; committed checkpoints are whole)."""
    message = interrupted_message(paths)
    os.write(2, f"\n{message}\n".encode())  # (a signal handler: no print, whose stream may be mid-write)
    record_end(paths, "stopped", None, message, 130)
    if lock:
        lock.release()
    os._exit(130)


def record_failure(paths: RunPaths | None, fresh: NewRunFolder | None, reason: str, exit_code: int) -> None:
    """A failed run: the folder of a new run whose start failed before its first step, with nothing
    saved, is removed (``run_start.discard_failed_start``: one line says so); else end.json records it."""
    jax = sys.modules.get("jax")
    if fresh is not None and (jax is None or jax.process_index() == 0):
        removed = discard_failed_start(fresh)
        if removed:
            print(removed, file=sys.stderr)
            return
    record_end(paths, "failed", None, reason, exit_code)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 the run finished or stopped with its step saved (SIGTERM, one Ctrl-C, --stop-at,
    the end of the data); 2 bad input or environment, in one line (config, data, tokenizer, a run
    another trainer holds, a disk that is full or cannot be written, a checkpoint that cannot be
    read or saved); 3 halted on non-finite steps (train.on_nan); 130 a second Ctrl-C; 1 a bug
    (traceback)."""
    args = parse_args(argv)
    paths = fresh = lock = None  # fresh: the folder of a new run as it was before its start
    try:
        group = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
        distributed.initialize(group)  # before any device is touched; no-op for one process
        plan = None
        if args.resume:
            target = resume_lib.parse_target(args.resume, args.runs_dir, args.run_id)
            if not target.new_run and not args.dry_run:  # before the plan moves unfinished saves aside
                lock = lock_run(target.run_dir, group)
            cfg, plan = resume_lib.plan(target, args.config, args.overrides, args.stop_at, dry_run=args.dry_run)
        elif args.config:
            cfg, notes = config_lib.load_with_notes(args.config, args.overrides)
            print("".join(f"note: {note}\n" for note in notes), end="", file=sys.stderr)
            resume_lib.check_stop_at(args.stop_at, cfg)
        else:
            raise ConfigError("give --config FILE for a new run (see configs/), or --resume to continue one")
        if args.dry_run:
            dry_run(cfg)
            return 0
        if group and not args.run_id:  # every process must write to the same run directory
            args.run_id = default_run_id(cfg, distributed.broadcast_from_first(int(time.time())))
        inputs = read_inputs(cfg)  # before the run folder exists: a bad data file or tokenizer leaves nothing
        if plan and not plan.target.new_run:
            paths = RunPaths(plan.target.run_dir)
            paths.config.write_text(config_lib.dump(cfg))
        else:
            root = Path(args.runs_dir) / (args.run_id or default_run_id(cfg))
            before = NewRunFolder.before_start(root)
            lock = lock_run(make_run_folder(root), group)
            paths = prepare_run_dir(root, cfg)
            fresh = before  # (only once the lock is held: a refused start must not touch the holder's run)
        summary = train(cfg, paths, inputs, resume=plan, stop_at=args.stop_at, run_eval=not args.no_eval,
                        on_second_interrupt=lambda: end_at_once(paths, lock))
    except (ConfigError, OSError) as e:  # bad input, or the disk / file system: one line, no traceback
        message = str(e) if isinstance(e, ConfigError) else f"{e} ({type(e).__name__})"
        print(f"error: {message}", file=sys.stderr)
        record_failure(paths, fresh, message, 2)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training began (its handler saves from the first step on)
        message = interrupted_message(paths, "Ctrl-C")
        print(f"\n{message}", file=sys.stderr)
        record_end(paths, "stopped", None, message, 130)
        return 130
    except BaseException as e:
        record_failure(paths, fresh, f"{type(e).__name__}: {e}", 1)
        raise
    finally:
        if lock:
            lock.release()
    print_summary(paths, summary)
    state, reason, code = end_of(summary)
    record_end(paths, state, summary["step"], reason, code)
    return code


def run_cli() -> None:
    """``train.py``'s entry point: ``main()``, then exit at once with its code. Everything the run
    owns is on disk by then (saves waited for, event files closed, end.json written); what is left
    is interpreter teardown, which waits for library threads (seconds for JAX and the data
    workers, and about 300 s for Orbax threads still waiting on a save that failed). Several
    processes exit normally: JAX's distributed shutdown must run on each of them."""
    try:
        code = main()
    except SystemExit as e:  # argparse: --help, a usage error (it has printed why)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except KeyboardInterrupt:  # a Ctrl-C after the run's own handling (its summary was being printed)
        print("\ninterrupted (Ctrl-C) after the run ended", file=sys.stderr)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
