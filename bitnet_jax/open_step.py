"""Opening one step of a run for reading: ``open_step`` validates it once and is the one place where
a damaged newest step gives way to the next older one; ``OpenStep.verify`` compares what was read with
the step's checksum (state_checksum.py). Resume, generate, export and the manager's restore read
steps through it (checkpoint.py holds the Orbax saves and restores; run_dir.py the files as files).

Validating a step: its folder is structurally complete and its metadata parsed once (run_dir.py's
scan), the stored array shapes checked once against the model. A read that meets damaged files
raises ``CheckpointDamaged``; so does damage that decodes without an error (bytes flipped inside a
compressed chunk, an edited data position), found by the checksum. Orbax's noise while reading goes
to RUN_DIR/orbax_errors.log (orbax_noise.py). Damaged steps are moved aside (``move_aside``) into
RUN_DIR/damaged_checkpoints/ when a run continues in place.

Public API::

    open_step(run_dir, step=None) -> OpenStep        # .cfg, .meta, .check_fits(tree), .read(fn), .verify()
    move_aside(run_dir, {step: problem}) -> {step: new path}
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax

from bitnet_jax import orbax_noise, state_checksum
from bitnet_jax.config import Config
from bitnet_jax.damage import damage_reason
from bitnet_jax.run_dir import (STATE, CheckpointDamaged, CheckpointError, RunPaths, SavedStep, check_meta,
                                checkpoints_dir, config_of, older_complete, resolve_step, scan_steps)
from bitnet_jax.state_tree import check_shapes, shape_key

T = TypeVar("T")


class OpenStep:
    """One complete step of a run, validated once: its folder is complete and its metadata parsed
    (``meta``; ``cfg`` is the config stored in it, parsed on first use); ``check_fits`` checks the
    stored array shapes against a model, once per model.

    ``read(fn)`` runs ``fn(step)``, a read of the step's arrays. When the files turn out to be damaged
    (``CheckpointDamaged``) and the step was not named by the user (``fallback``), it warns, moves the
    damaged step aside when asked (a run continued in place saves that step again), and runs ``fn``
    on the next older complete step, once: a second damaged step raises, naming what to pass. Other
    errors surface as they are, with a note that the checkpoint was left in place."""

    def __init__(self, run_dir: Path, scan: dict[int, SavedStep], step: int, *, fallback: bool,
                 resuming: bool):
        saved = scan[step]
        self.run_dir, self.scan, self.step, self.path = run_dir, scan, step, saved.path
        self.meta = check_meta(saved.meta, saved.path)
        self.fallback = fallback  # may a damaged step give way to an older one
        self.resuming = resuming  # for the advice in error messages: resume, or generate / export
        self._cfg: Config | None = None
        self._stored: dict | None = None  # the stored state's array metadata (shapes, dtypes)
        self._fits: tuple | None = None  # shape_key of the model it was last checked against
        self._noted = False  # the note that the step has no checksum was printed

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = config_of(self.meta, self.path)
        return self._cfg

    def older(self) -> list[int]:
        """The complete steps before this one (as found when the run directory was scanned)."""
        return [s.step for s in older_complete(self.scan, self.step)]

    def check_fits(self, expected: dict, partial: bool = False) -> None:
        """Raises a CheckpointError naming the first stored entry whose shape or dtype differs from
        ``expected`` (a tree of ``.shape``/``.dtype`` leaves, e.g. ``state_tree.abstract_tree``);
        ``partial``: only the top-level entries ``expected`` has (e.g. the params). Reads the
        stored array metadata once; no compute."""
        key = shape_key(expected), partial
        if key == self._fits:
            return
        if self._stored is None:
            self._stored = self._read_array_metadata()
        stored = {k: v for k, v in self._stored.items() if k in expected} if partial else self._stored
        check_shapes(stored, expected, f"checkpoint {self.path}")
        self._fits = key

    def _read_array_metadata(self) -> dict:
        """From ``state/_METADATA`` and the arrays' zarr headers inside the OCDBT database (so a damaged
        database shows up here already)."""
        ocp = orbax_noise.orbax()
        # The handler, not StandardCheckpointer().metadata: that one logs read errors and returns None.
        meta = self.read_files(lambda: ocp.StandardCheckpointHandler().metadata(self.path / STATE),
                               f"reading the metadata of {STATE}/: ")
        tree = getattr(meta, "tree", meta)
        if not isinstance(tree, dict):
            raise CheckpointError(f"checkpoint {self.path}: Orbax returned no array metadata for {STATE}/ "
                                  f"(got {type(tree).__name__}); it was not written by this version")
        return dict(tree)

    def read_files(self, read: Callable[[], T], what: str = "") -> T:
        """``read()``, an Orbax read of this step: damaged files raise ``CheckpointDamaged``; any other
        error is re-raised as it is, with a note that the checkpoint was left in place."""
        try:
            with orbax_noise.captured(self.run_dir / orbax_noise.LOG_NAME):
                return read()
        except Exception as e:
            reason = damage_reason(e, self.path)
            if reason is None:
                again = "resume again" if self.resuming else "run the command again"
                e.add_note(f"(raised while restoring checkpoint {self.path}; this is not damage to its files, "
                           f"so the checkpoint was left in place: fix the cause and {again})")
                raise
        # Raised outside the handler, so the failed read's frames (and arrays) are freed.
        raise CheckpointDamaged(self.path, what + reason)

    def read(self, fn: Callable[["OpenStep"], T], *, move_damaged: bool = False) -> T:
        """``fn(step)`` on this step, or on the next older one when this one is damaged (see the class)."""
        try:
            return fn(self)
        except CheckpointDamaged as e:
            first = e
        older = self.older()
        if not self.fallback or not older:
            raise CheckpointDamaged(first.step_dir, f"{first.reason}; {self._advice(older)}") from None
        moved = move_aside(self.run_dir, {self.step: first.reason}, warn=False) if move_damaged else {}
        where = f"moved damaged checkpoint to {moved[self.step]}; " if self.step in moved else ""
        log = self.run_dir / orbax_noise.LOG_NAME
        noise = f" (Orbax's messages: {log})" if log.is_file() else ""
        warnings.warn(f"skipping checkpoint: {first}; {where}trying step {older[-1]}{noise}",
                      orbax_noise.CheckpointWarning, stacklevel=2)
        previous = OpenStep(self.run_dir, self.scan, older[-1], fallback=False, resuming=self.resuming)
        try:
            return fn(previous)
        except CheckpointDamaged as e:
            second = e
        moved = f" (moved to {RunPaths(self.run_dir).damaged}/)" if move_damaged else ""
        if self.resuming:
            advice = (f"To go on from an older step, start a new run from it: --resume "
                      f"{checkpoints_dir(self.run_dir)}/STEP --run-id NEW_ID; or, if {second.step_dir} is "
                      "beyond repair, move it out of checkpoints/ and --resume latest again")
        else:
            advice = "To read an older step, name it (--step STEP)"
        raise CheckpointDamaged(second.step_dir, (
            f"{second.reason}; the newer {first.step_dir} is damaged too{moved}. It is the second damaged "
            f"step in a row, so no older step is tried without your say{'; nothing else was moved' if moved else ''}. "
            f"{advice} (older complete steps: {older[:-1] or 'none'})")) from None

    def _advice(self, older: list[int]) -> str:
        """What to do about this damaged step when no older one is tried in its place."""
        if not older:
            return "no older complete step is left to go on from"
        if self.resuming:
            return (f"--resume latest goes on from step {older[-1]} instead (moving this one aside), "
                    f"or start a new run from an older step: --resume {checkpoints_dir(self.run_dir)}/STEP "
                    f"--run-id NEW_ID (older complete steps: {older})")
        return f"name an older step (--step STEP; complete: {older}), or leave it out for the newest readable one"

    def verify(self, state_tree: dict | None = None, data: Any = None) -> None:
        """Compares what was read of this step (``state_tree``: the arrays as ``state_tree.to_tree``
        lays them out, all or a part; ``data``: the data item) and its meta item with the checksum
        stored in the meta item; a difference raises ``CheckpointDamaged``. Steps saved before
        checksums restore with a note. Several processes: call it on every process (a collective)."""
        stored = self.meta.get("checksum")
        if stored is None:
            if not self._noted:
                print(f"note: {self.path} was saved before checkpoints carried checksums; it is restored "
                      "without verifying its contents", file=sys.stderr)
                self._noted = True
            return
        meta = {k: v for k, v in self.meta.items() if k != "checksum"}
        arrays = None if state_tree is None else state_checksum.fetch(state_checksum.array_hashes(state_tree))
        problem = state_checksum.mismatch(stored, arrays=arrays, data=data, meta=meta)
        if problem is not None:
            raise CheckpointDamaged(self.path, problem)


def open_step(run_dir: str | Path, step: int | None = None, *, fallback: bool | None = None,
              resuming: bool = False) -> OpenStep:
    """Step ``step`` of ``run_dir`` (None: the newest complete one; incomplete newer folders are skipped
    with a warning), validated (see ``OpenStep``). ``fallback``: whether a damaged step may give way
    to an older one (default: only when ``step`` is None). ``resuming``: the caller is a resume (the
    advice in errors says so). ``run_dir`` may be relative to the working directory."""
    run_dir = Path(run_dir).resolve()  # Orbax refuses relative paths
    scan = scan_steps(run_dir)  # each step's small files read once, here
    chosen = resolve_step(run_dir, step, scan)
    return OpenStep(run_dir, scan, chosen, fallback=step is None if fallback is None else fallback,
                    resuming=resuming)


def move_aside(run_dir: Path, steps: dict[int, str], warn: bool = True) -> dict[int, Path]:
    """Moves damaged step directories (step -> problem) out of Orbax's way (the continued run saves
    those steps again) into RUN_DIR/damaged_checkpoints/, keeping them for inspection.

    Several processes: every process calls this at the same point, and only process 0 touches the
    folders; the others wait at a barrier until it is done, so no two processes race to move the same
    directory and none reads checkpoints/ half-way through. The barrier is unconditional (``steps``
    may be empty): a process that lists checkpoints/ after process 0 has moved a step sees nothing to
    move, yet must meet it at the same barrier. Returns step -> where it went (of the steps this
    process moved); ``warn``: say so in a warning each."""
    several = jax.distributed.is_initialized()  # (asks without starting a backend: dry runs stay light)
    moved = {}
    try:
        if steps and (not several or jax.process_index() == 0):
            for step, problem in steps.items():
                src = checkpoints_dir(run_dir) / str(step)
                dst = RunPaths(run_dir).damaged / f"{step}.{int(time.time())}"
                dst.parent.mkdir(exist_ok=True)
                shutil.move(str(src), str(dst))
                moved[step] = dst
                if warn:
                    warnings.warn(f"moved damaged checkpoint {src} ({problem}) to {dst}",
                                  orbax_noise.CheckpointWarning, stacklevel=2)
    finally:  # process 0 reaches the barrier even when a move fails (it then raises after it)
        if several:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("bitnet_jax: damaged checkpoints moved aside")
    return moved
