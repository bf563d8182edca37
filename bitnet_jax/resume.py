"""Continuing runs from the command line: what ``--resume`` names, which config applies, ``--stop-at``,
and stop requests from SIGTERM / SIGINT.

``--resume`` takes one of:

- ``latest`` or ``STEP`` (an integer) with ``--run-id ID`` (and ``--runs-dir``): continue the run
  ``RUNS_DIR/ID`` from its newest complete step, or from that step;
- ``RUN_DIR`` (a folder holding ``checkpoints/``): continue that run from its newest complete step;
- ``RUN_DIR/checkpoints/STEP`` (one step directory, of any run): start a NEW run (``--run-id``, or
  the default id, under ``--runs-dir``) from that step's weights, optimizer state, step, data position
  and resumables.

Continuing a run uses the config stored in the checkpoint; ``--config`` may be omitted, and when given
it (with ``--set``) must agree with the stored one except for the keys in ``RESUME_MAY_CHANGE``. A new
run from a step directory may change any key (``--config`` replaces the stored config); a model whose
shapes differ from the checkpoint's is refused, naming the first differing parameter.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

from bitnet_jax import checkpoint as ckpt_lib
from bitnet_jax import config as config_lib
from bitnet_jax.checkpoint import CheckpointDamaged, CheckpointError
from bitnet_jax.config import Config, ConfigError

# Keys that do not change the math of the remaining steps: reporting, intervals, throughput knobs.
# (eval.batches is not here: with data.eval_documents null it sets how many documents are held out
# of training.) mesh.* and model.attention change float summation order, not the update rule: the
# run continues correctly, but bit-for-bit equality with an uninterrupted run needs the same values,
# so changing them prints a note (RESUME_NOT_BITWISE).
RESUME_MAY_CHANGE = ("name", "log.*", "eval.every", "checkpoint.*", "data.num_workers",
                     "data.prefetch_batches", "data.tokenize_batch", "mesh.*", "model.attention")
RESUME_NOT_BITWISE = ("mesh.*", "model.attention")


@dataclasses.dataclass(frozen=True)
class ResumeTarget:
    run_dir: Path  # the run holding the checkpoint
    step: int | None  # None: the newest complete step (damaged newer ones are skipped)
    new_run: bool  # True: start a new run from a step directory of (maybe) another run


def parse_target(resume: str, runs_dir: str, run_id: str | None) -> ResumeTarget:
    """Turns ``--resume`` (with ``--runs-dir``/``--run-id``) into a target; checks it exists."""
    if resume == "latest" or resume.isdigit():
        if not run_id:
            raise ConfigError(f"--resume {resume} needs to know the run: add --run-id ID (and --runs-dir "
                              "if it is not under runs/), or pass --resume RUN_DIR")
        run_dir = Path(runs_dir) / run_id
        if not ckpt_lib.checkpoints_dir(run_dir).is_dir():
            raise ConfigError(f"--resume {resume}: {run_dir} has no checkpoints/ folder; check --run-id "
                              "and --runs-dir")
        return ResumeTarget(run_dir.resolve(), None if resume == "latest" else int(resume), new_run=False)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such file or folder; pass latest or STEP with --run-id, "
                          "a run directory, or a checkpoint directory RUN_DIR/checkpoints/STEP")
    if ckpt_lib.checkpoints_dir(path).is_dir():
        if run_id and Path(runs_dir, run_id).resolve() != path.resolve():
            raise ConfigError(f"--resume {resume} continues that run in place; drop --run-id {run_id} "
                              f"(or pass --resume {resume}/checkpoints/STEP to start a new run from it)")
        return ResumeTarget(path.resolve(), None, new_run=False)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return ResumeTarget(path.parent.parent.resolve(), int(path.name), new_run=True)
    raise ConfigError(f"--resume {resume}: neither a run directory (a folder holding checkpoints/) nor a "
                      "checkpoint directory (RUN_DIR/checkpoints/STEP)")


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def may_change(key: str) -> bool:
    return _matches(key, RESUME_MAY_CHANGE)


def resolve_config(target: ResumeTarget, step_dir: Path, config_path: str | None,
                   overrides: list[str]) -> Config:
    """The config of the resumed run: the stored one with the allowed changes (see the module doc)."""
    stored = ckpt_lib.read_config(step_dir)
    if config_path is not None:
        cfg = config_lib.load(config_path, overrides)
    else:
        cfg = config_lib.with_overrides(stored.to_dict(), overrides)  # a broken rule names the --set key
    if not target.new_run:
        changed = config_lib.diff_keys(stored, cfg)
        refused = [k for k in changed if not may_change(k)]
        if refused:
            source = f"{config_path} and --set" if config_path else "--set"
            raise ConfigError(
                f"{source} would change {', '.join(refused)} of the resumed run (stored in {step_dir}), "
                f"which changes the math of the remaining steps; on resume only these may change: "
                f"{', '.join(RESUME_MAY_CHANGE)}. Omit --config to use the stored config, or start a new "
                f"run from the checkpoint with --resume {step_dir} --run-id NEW_ID")
        inexact = [k for k in changed if _matches(k, RESUME_NOT_BITWISE)]
        if inexact:
            print(f"note: {', '.join(inexact)} differ from {step_dir}; they change the order of float "
                  "sums, so the resumed run stays exact in the math but not to the bit: its losses and "
                  "weights will not match an uninterrupted run bit for bit (keep the stored values for "
                  "that)", file=sys.stderr)
    return cfg


def check_continuable(target: ResumeTarget, step: int, dry_run: bool = False) -> None:
    """A run continued in place will save steps after ``step`` again: refuse when complete newer
    checkpoints exist (they would be overwritten), move incomplete newer directories aside (with
    ``dry_run``: only say which would be moved)."""
    if target.new_run:
        return
    problems = {s: problem for s, problem in ckpt_lib.step_problems(target.run_dir).items() if s > step}
    newer = [s for s, problem in problems.items() if problem is None]
    if newer:
        raise ConfigError(
            f"step {step} is not the newest checkpoint of {target.run_dir} (newer: {newer}); continuing "
            f"from it in place would overwrite them. Branch into a new run instead: --resume "
            f"{ckpt_lib.checkpoints_dir(target.run_dir) / str(step)} --run-id NEW_ID")
    # (with several processes, one listing after process 0 has moved a step sees fewer; fine: only
    # process 0 moves, and move_aside is called on every process to meet at its barrier)
    moves = {s: problem for s, problem in problems.items() if problem is not None}
    if dry_run:
        for s, problem in moves.items():
            print(f"dry run: would move the incomplete checkpoint "
                  f"{ckpt_lib.checkpoints_dir(target.run_dir) / str(s)} ({problem}) to "
                  f"{target.run_dir / 'damaged_checkpoints'}/", file=sys.stderr)
        return
    move_aside(target.run_dir, moves)


def move_aside(run_dir: Path, steps: dict[int, str]) -> None:
    """Moves damaged step directories (step -> problem) out of Orbax's way (the continued run saves
    those steps again) into RUN_DIR/damaged_checkpoints/, keeping them for inspection.

    Several processes: every process calls this at the same point, and only process 0 touches the
    folders; the others wait at a barrier until it is done, so no two processes race to move the same
    directory and none reads checkpoints/ half-way through. The barrier is unconditional (``steps``
    may be empty): a process that lists checkpoints/ after process 0 has moved a step sees nothing to
    move, yet must meet it at the same barrier."""
    import jax

    several = jax.distributed.is_initialized()  # (asks without starting a backend: dry runs stay light)
    try:
        if steps and (not several or jax.process_index() == 0):
            for step, problem in steps.items():
                src = ckpt_lib.checkpoints_dir(run_dir) / str(step)
                dst = run_dir / "damaged_checkpoints" / f"{step}.{int(time.time())}"
                dst.parent.mkdir(exist_ok=True)
                shutil.move(str(src), str(dst))
                warnings.warn(f"moved damaged checkpoint {src} ({problem}) to {dst}", stacklevel=2)
    finally:  # process 0 reaches the barrier even when a move fails (it then raises after it)
        if several:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("bitnet_jax: damaged checkpoints moved aside")


def check_stop_at(stop_at: int | None, cfg: Config, start_step: int = 0) -> None:
    if stop_at is None:
        return
    if not start_step < stop_at <= cfg.train.steps:
        raise ConfigError(f"--stop-at {stop_at} must lie in ({start_step}, {cfg.train.steps}]: after the "
                          f"current step {start_step} and at most train.steps")


@dataclasses.dataclass
class Restored:
    state: object  # TrainState on the mesh
    data_state: dict | None  # this process's loader state (None: start the data from the beginning)
    meta: dict  # the checkpoint's meta item (step, tokens_seen, config, resumables, ...)
    step: int
    step_dir: Path


def restore(target: ResumeTarget, step: int, like, shardings) -> Restored:
    """Restores ``step`` of ``target`` into ``like``'s structure.

    With ``latest`` (``target.step`` None), a step whose files turn out to be damaged
    (``CheckpointDamaged``: missing, truncated, undecodable) is moved aside (warning naming it) and the
    next older complete step is tried, once: a second damaged step raises, naming what to pass, and
    stays where it is. Any other error (out of memory, sharding, file system) is raised as it is and
    moves nothing. An explicit step is never replaced by another."""
    fallback_from: CheckpointDamaged | None = None
    while True:
        step_dir = ckpt_lib.checkpoints_dir(target.run_dir) / str(step)
        older = [s for s in ckpt_lib.complete_steps(target.run_dir) if s < step]  # before anything moves
        mngr = ckpt_lib.CheckpointManager(target.run_dir, ckpt_lib.read_config(step_dir), read_only=True)
        try:
            state, data_states, meta = _restore_on_every_process(mngr, step, like, shardings)
        except CheckpointDamaged as e:
            damaged = e
        else:
            return Restored(state, this_process_data(data_states, target, step_dir), meta, step, step_dir)
        finally:
            mngr.close()
        if fallback_from is not None:
            raise CheckpointDamaged(damaged.step_dir, (
                f"{damaged.reason}. It is the second damaged step in a row (the newer "
                f"{fallback_from.step_dir} was moved to {target.run_dir / 'damaged_checkpoints'}/), so "
                "no older step is tried without your say; nothing else was moved. To go on from an older "
                f"step, start a new run from it: --resume {ckpt_lib.checkpoints_dir(target.run_dir)}/STEP "
                f"--run-id NEW_ID (complete older steps: {older or 'none'}); or, if {step_dir} is beyond "
                "repair, move it out of checkpoints/ and --resume latest again")) from None
        if target.step is not None or not older:
            raise damaged
        warnings.warn(f"skipping checkpoint: {damaged}; trying step {older[-1]}", stacklevel=2)
        if not target.new_run:
            move_aside(target.run_dir, {step: damaged.reason})
        fallback_from, step = damaged, older[-1]


def _restore_on_every_process(mngr, step: int, like, shardings):
    """``mngr.restore`` with the processes agreeing on the outcome: a step damaged for one process
    (each reads only the array chunks it holds) is damaged for all, so they all fall back to the
    same step; an error on one makes the others stop too instead of training on alone."""
    import jax

    if jax.process_count() == 1:
        return mngr.restore(step, like, shardings)
    outcome, error, result = "ok", None, None
    try:
        result = mngr.restore(step, like, shardings)
    except CheckpointDamaged as e:
        outcome, error = "damaged", e
    except Exception as e:  # re-raised below, after the others have heard of it
        outcome, error = "error", e
    # A collective: every process gets here. (An error raised on one process before Orbax's own
    # collectives inside restore leaves the others at those instead; gloo then aborts them all: the run
    # still stops, just less tidily.)
    outcomes = ckpt_lib.gather_json(outcome)
    if error is not None and (outcome == "error" or "error" not in outcomes):
        raise error
    if "error" in outcomes:
        raise CheckpointError(f"process {outcomes.index('error')} failed to restore step {step} (see its "
                              "output); this process stops with it")
    if "damaged" in outcomes:
        raise error or CheckpointDamaged(ckpt_lib.checkpoints_dir(mngr.run_dir) / str(step),
                                         f"process {outcomes.index('damaged')} could not read its part")
    return result


def this_process_data(data_states: list, target: ResumeTarget, step_dir: Path) -> dict | None:
    """This process's saved loader state. The data position cannot be re-split over another number
    of processes: continuing a run then is refused; a new run starts its data from the beginning."""
    import jax

    pi, pc = jax.process_index(), jax.process_count()
    if len(data_states) == pc:
        return data_states[pi]
    if not target.new_run:
        raise ConfigError(f"{step_dir} was saved by {len(data_states)} process(es) but this run has {pc}: "
                          f"continue it with {len(data_states)}, or start a new run from it (its data "
                          f"then starts from the beginning) with --resume {step_dir} --run-id NEW_ID")
    print(f"note: {step_dir} was saved by {len(data_states)} process(es), this run has {pc}; the new "
          "run's data stream starts from the beginning", file=sys.stderr)
    return None


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What ``--resume`` resolved to, checked before any compute."""
    target: ResumeTarget
    step: int
    step_dir: Path


def plan(resume: str, runs_dir: str, run_id: str | None, config_path: str | None,
         overrides: list[str], stop_at: int | None, dry_run: bool = False) -> tuple[Config, ResumePlan]:
    """Resolves ``--resume`` and the config it runs with (see the module docstring); raises
    ConfigError with what to pass instead when anything does not fit. ``dry_run``: changes nothing on
    disk (incomplete newer step directories are only named, not moved aside)."""
    target = parse_target(resume, runs_dir, run_id)
    step = ckpt_lib.resolve_step(target.run_dir, target.step)  # the named or newest complete step
    step_dir = ckpt_lib.checkpoints_dir(target.run_dir) / str(step)
    cfg = resolve_config(target, step_dir, config_path, overrides)
    if step >= cfg.train.steps:
        raise ConfigError(f"{step_dir} is the end of its run (train.steps = {cfg.train.steps}); nothing to "
                          "continue. To train further, start a new run from it with a larger train.steps: "
                          f"--resume {step_dir} --run-id NEW_ID --set train.steps=N")
    check_stop_at(stop_at, cfg, step)
    ckpt_lib.check_fits(step_dir, cfg)
    check_continuable(target, step, dry_run=dry_run)
    return cfg, ResumePlan(target, step, step_dir)


# Keys whose change makes the stored data position meaningless for a new run (a new stream then starts).
_DATA_KEYS = ("data.*", "tokenizer.*", "train.batch_size", "train.seq_len", "eval.batches")


def initial_state(cfg: Config, mesh, plan: ResumePlan | None):
    """``(graphdef, state, state_sharding, restored)``: a fresh TrainState on ``mesh``, or the one of
    ``plan`` (``restored`` then holds its data state and metadata)."""
    from bitnet_jax import train_state
    from bitnet_jax.sharding import state_shardings

    if plan is None:
        graphdef, state = train_state.init_state(cfg)
        state, shardings = train_state.place_state(state, mesh)
        return graphdef, state, shardings, None
    graphdef, abstract = train_state.abstract_state(cfg)  # no random init: the checkpoint fills it
    shardings = state_shardings(abstract, mesh)
    restored = restore(plan.target, plan.step, abstract, shardings)
    print(f"resuming from {restored.step_dir} (step {restored.step}, "
          f"{restored.meta.get('tokens_seen', 0):,} tokens seen)", file=sys.stderr)
    if plan.target.new_run:
        changed = [k for k in config_lib.diff_keys(ckpt_lib.read_config(restored.step_dir), cfg)
                   if _matches(k, _DATA_KEYS) and not may_change(k)]
        if changed:
            print(f"note: changed from {restored.step_dir}: {', '.join(changed)}; the new run's data "
                  "stream starts from the beginning", file=sys.stderr)
            restored.data_state = None
    return graphdef, restored.state, shardings, restored


def load_resumables(resumables: dict, meta: dict) -> None:
    """Hands each registered host-side object its saved state (names saved but not registered now,
    and registered but not saved, are reported and skipped)."""
    saved = meta.get("resumables", {})
    for name, obj in resumables.items():
        if name in saved:
            obj.load_state_dict(saved[name])
        else:
            print(f"note: the checkpoint holds no state for {name!r}; it starts fresh", file=sys.stderr)


def resume_command(run_dir: Path) -> str:
    return f"python train.py --resume {run_dir}"


class StopRequest:
    """SIGTERM / SIGINT set a flag that the train loop checks between steps (the handler never saves:
    the loop saves the current step, waits for it, and exits 0). A second SIGINT raises
    KeyboardInterrupt: the loop stops where it is without saving the current step, but it does not
    end at once: the loop's cleanup (``CheckpointManager.close``) still waits for saves already
    started, so none is left half-written, before the KeyboardInterrupt ends the run."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def seconds_since(self) -> float | None:
        """Seconds from the signal to now (None without one): how long the stop took."""
        return None if self.received_at is None else time.perf_counter() - self.received_at

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (started saves are still waited for)
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.perf_counter()

    def install(self) -> "StopRequest":
        """Installs the handlers (main thread of a single-process run only: with several processes
        JAX's preemption sync, read through the checkpoint manager, decides the stop step)."""
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
