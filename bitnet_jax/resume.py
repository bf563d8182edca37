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
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bitnet_jax import config as config_lib
from bitnet_jax.config import Config, ConfigError
from bitnet_jax.distributed import gather_json
from bitnet_jax.run_dir import (CheckpointDamaged, CheckpointError, SavedStep, checkpoints_dir, permanent_steps,
                                read_config)

# bitnet_jax.checkpoint and bitnet_jax.open_step (jax, flax, Orbax) are imported where a checkpoint is
# read: train.py's checks of its arguments and config run, and fail, before several seconds of imports.
if TYPE_CHECKING:
    from bitnet_jax.open_step import OpenStep

# Keys that do not change the math of the remaining steps: reporting, intervals, throughput knobs.
# (eval.batches is not here: with data.eval_documents null it sets how many documents are held out
# of training.) mesh.* and model.attention change float summation order, not the update rule: the
# run continues correctly, but bit-for-bit equality with an uninterrupted run needs the same values,
# so changing them prints a note (RESUME_NOT_BITWISE).
RESUME_MAY_CHANGE = ("name", "log.*", "eval.every", "checkpoint.*", "data.num_workers",
                     "data.prefetch_batches", "data.tokenize_batch", "mesh.*", "model.attention", "model.matmul")
RESUME_NOT_BITWISE = ("mesh.*", "model.attention", "model.matmul")


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
        if not checkpoints_dir(run_dir).is_dir():
            raise ConfigError(f"--resume {resume}: {run_dir} has no checkpoints/ folder; check --run-id "
                              "and --runs-dir")
        return ResumeTarget(run_dir.resolve(), None if resume == "latest" else int(resume), new_run=False)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such file or folder; pass latest or STEP with --run-id, "
                          "a run directory, or a checkpoint directory RUN_DIR/checkpoints/STEP")
    if checkpoints_dir(path).is_dir():
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
                   overrides: list[str], stored: Config | None = None) -> Config:
    """The config of the resumed run: the stored one with the allowed changes (see the module doc).
    ``stored``: the config stored in ``step_dir``, when the caller has read it already."""
    if stored is None:
        stored = read_config(step_dir)
    if config_path is not None:
        cfg = config_lib.load(config_path, overrides)
    elif overrides:
        cfg = config_lib.with_overrides(stored.to_dict(), overrides)  # a broken rule names the --set key
    else:
        cfg = stored
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


def check_continuable(target: ResumeTarget, step: int, scan: dict[int, SavedStep], dry_run: bool = False) -> None:
    """A run continued in place will save steps after ``step`` again: refuse when complete newer
    checkpoints exist (they would be overwritten), move incomplete newer directories aside (with
    ``dry_run``: only say which would be moved). ``scan``: the run's ``run_dir.scan_steps``."""
    if target.new_run:
        return
    problems = {s: saved.problem for s, saved in scan.items() if s > step}
    newer = [s for s, problem in problems.items() if problem is None]
    if newer:
        raise ConfigError(
            f"step {step} is not the newest checkpoint of {target.run_dir} (newer: {newer}); continuing "
            f"from it in place would overwrite them. Branch into a new run instead: --resume "
            f"{checkpoints_dir(target.run_dir) / str(step)} --run-id NEW_ID")
    # (with several processes, one listing after process 0 has moved a step sees fewer; fine: only
    # process 0 moves, and move_aside is called on every process to meet at its barrier)
    moves = {s: problem for s, problem in problems.items() if problem is not None}
    if dry_run:
        for s, problem in moves.items():
            print(f"dry run: would move the incomplete checkpoint "
                  f"{checkpoints_dir(target.run_dir) / str(s)} ({problem}) to "
                  f"{target.run_dir / 'damaged_checkpoints'}/", file=sys.stderr)
        return
    from bitnet_jax.open_step import move_aside

    move_aside(target.run_dir, moves)


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
    stored_cfg: Config | None = None  # the config stored in the checkpoint


def restore(target: ResumeTarget, step: int, like, shardings, opened: OpenStep | None = None) -> Restored:
    """Restores ``step`` of ``target`` into ``like``'s structure (``opened``: that step as ``plan``
    opened it). With ``latest`` (``target.step`` None) a damaged step gives way to the next older
    one, once, and is moved aside when the run continues in place (``open_step.OpenStep.read``);
    an explicit step is never replaced by another."""
    from bitnet_jax import checkpoint as ckpt_lib
    from bitnet_jax.open_step import open_step

    if opened is None:
        opened = open_step(target.run_dir, step, fallback=target.step is None, resuming=True)

    def read(s: OpenStep) -> Restored:
        mngr = ckpt_lib.CheckpointManager(target.run_dir, s.cfg, read_only=True)
        try:
            state, data_states, meta = _restore_on_every_process(mngr, s, like, shardings)
        finally:
            mngr.close()
        return Restored(state, this_process_data(data_states, target, s.path), meta, s.step, s.path, s.cfg)

    return opened.read(read, move_damaged=not target.new_run)


def _restore_on_every_process(mngr, opened: OpenStep, like, shardings):
    """``mngr.restore`` with the processes agreeing on the outcome: a step damaged for one process
    (each reads only the array chunks it holds) is damaged for all, so they all fall back to the
    same step; an error on one makes the others stop too instead of training on alone."""
    import jax

    step = opened.step
    if jax.process_count() == 1:
        return mngr.restore(step, like, shardings, opened)
    outcome, error, result = "ok", None, None
    try:
        result = mngr.restore(step, like, shardings, opened, verify=False)
    except CheckpointDamaged as e:
        outcome, error = "damaged", e
    except Exception as e:  # re-raised below, after the others have heard of it
        outcome, error = "error", e
    # A collective: every process gets here. (An error raised on one process before Orbax's own
    # collectives inside restore leaves the others at those instead; gloo then aborts them all: the run
    # still stops, just less tidily.)
    outcomes = gather_json(outcome)
    if error is not None and (outcome == "error" or "error" not in outcomes):
        raise error
    if "error" in outcomes:
        raise CheckpointError(f"process {outcomes.index('error')} failed to restore step {step} (see its "
                              "output); this process stops with it")
    if "damaged" in outcomes:
        raise error or CheckpointDamaged(opened.path, f"process {outcomes.index('damaged')} could not read its part")
    # Only now, with every process holding its part: the checksum is a reduction over the global arrays
    # (a collective), the same value on every process, so all of them agree on a mismatch too.
    mngr.verify_last_restore()
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
    opened: OpenStep | None = None  # the step, validated once (``open_step.open_step``)
    abstract: tuple | None = None  # (graphdef, abstract TrainState) of the run's config
    kept: list[int] | None = None  # steps permanent under the config they were saved with (in place)


def plan(target: ResumeTarget, config_path: str | None, overrides: list[str], stop_at: int | None,
         dry_run: bool = False) -> tuple[Config, ResumePlan]:
    """Resolves ``--resume`` (``parse_target``'s target) and the config it runs with (see the module
    docstring); raises ConfigError with what to pass instead when anything does not fit. A run
    continued in place has incomplete newer step directories moved aside (so its lock must be held);
    ``dry_run`` changes nothing on disk (they are only named)."""
    from bitnet_jax.open_step import open_step
    from bitnet_jax.state_tree import abstract_tree
    from bitnet_jax.train_state import abstract_state

    opened = open_step(target.run_dir, target.step, resuming=True)  # the named or newest complete step
    step, step_dir = opened.step, opened.path
    cfg = resolve_config(target, step_dir, config_path, overrides, stored=opened.cfg)
    if step >= cfg.train.steps:
        raise ConfigError(f"{step_dir} is the end of its run (train.steps = {cfg.train.steps}); nothing to "
                          "continue. To train further, start a new run from it with a larger train.steps: "
                          f"--resume {step_dir} --run-id NEW_ID --set train.steps=N")
    check_stop_at(stop_at, cfg, step)
    abstract = abstract_state(cfg)  # no random init: shapes only
    opened.check_fits(abstract_tree(abstract[1]))
    check_continuable(target, step, opened.scan, dry_run=dry_run)
    kept = None if target.new_run else permanent_steps(target.run_dir, opened.scan)
    return cfg, ResumePlan(target, step, step_dir, opened, abstract, kept)


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
    # no random init: the checkpoint fills it
    graphdef, abstract = plan.abstract or train_state.abstract_state(cfg)
    shardings = state_shardings(abstract, mesh)
    restored = restore(plan.target, plan.step, abstract, shardings, plan.opened)
    print(f"resuming from {restored.step_dir} (step {restored.step}, "
          f"{restored.meta.get('tokens_seen', 0):,} tokens seen)", file=sys.stderr)
    if plan.target.new_run:
        changed = [k for k in config_lib.diff_keys(restored.stored_cfg, cfg)
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
