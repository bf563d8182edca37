"""Checkpoints: Orbax saves and restores of ``RUN_DIR/checkpoints/<step>/`` (the files as files,
without Orbax: run_dir.py).

One step directory holds three Orbax items (``ocp.args.Composite``)::

    state/   StandardSave: {"step", "key", "params", "opt_state"} as plain nested dicts of arrays
             (params: ``nnx.State.to_pure_dict()`` layout, e.g. params/layers/0/mlp/down_proj/weight;
             see state_tree.py)
    data/    JsonSave: {"format", "processes": [data-loader state of process 0, 1, ...]}
    meta/    JsonSave: {"format", "step", "tokens_seen", "total_steps", "config" (resolved, as a dict),
             "resumables": {name: state_dict()}, "permanent" (an every-N or mandatory step: kept
             forever, whatever a resume changes), "saved_at" (unix time), "checksum" (a hash of every
             array of state/, of data/ and of the rest of meta/: state_checksum.py)}

Saves are asynchronous (the train loop is blocked only to enqueue an on-device copy of the state;
the device-to-host transfer and the file writes run in background threads) and atomic (see
run_dir.py). Per-step randomness is ``fold_in(key, step)``, so the stored base key and step are all
the PRNG state there is.

Every read of a step goes through ``open_step``: it validates the step once (folder structure,
metadata parsed once, stored shapes checked once against the model) and is the one place where a
damaged newest step gives way to the next older one (once). Resume, generate and export use it.
Every restore compares what it read with the step's checksum (``verify``): damage that decodes
without an error (bytes flipped inside a compressed chunk, an edited data position) raises
``CheckpointDamaged`` like a missing file. Orbax's noise while reading goes to RUN_DIR/orbax_errors.log
(orbax_noise.py).

Public API::

    open_step(run_dir, step=None) -> OpenStep        # .cfg, .meta, .check_fits(tree), .read(fn)
    load_params(run_dir, step=None) -> (cfg, params, step)
    CheckpointManager(run_dir, cfg)                  # the train loop's saver / restorer
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import jax

from bitnet_jax import orbax_noise, state_checksum
from bitnet_jax.config import Config
from bitnet_jax.damage import damage_reason, failure_cause
from bitnet_jax.distributed import gather_json
from bitnet_jax.model import abstract_model
from bitnet_jax.run_dir import (DATA, FORMAT, META, STATE, CheckpointDamaged, CheckpointError, KeepPolicy,
                                RunPaths, SavedStep, check_meta, checkpoints_dir, complete_steps, config_of,
                                mandatory_steps, older_complete, permanent_steps, resolve_step, scan_steps)
from bitnet_jax.state_tree import abstract_tree, check_shapes, from_tree, shape_key, to_tree

T = TypeVar("T")


def _ocp():
    import orbax.checkpoint as ocp  # on first use: a second of start-up that most imports of this module skip

    # Orbax logs every save at INFO through absl; keep the console for the progress bar.
    # ERROR: it also warns that item folders lack a _CHECKPOINT_METADATA file, which is by design.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


# --------------------------------------------------------------------------- opening a step

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
        ocp = _ocp()
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


# --------------------------------------------------------------------------- the manager

class CheckpointManager:
    """Saves and restores the steps of one run directory (see the module docstring).

    With ``checkpoint.async_save`` (the default) ``save`` blocks the loop only to enqueue an on-device
    copy of the state; a background thread hands that private copy to Orbax, whose device-to-host
    transfer (synchronous inside Orbax: hundreds of ms for the 95M state on an H100) then overlaps
    the next train steps, which are free to donate the original buffers. Orbax writes the files in
    its own background thread. At most one snapshot waits behind the save in progress. ``wait``
    blocks until the newest save is on disk; call ``close`` at the end (it waits too)."""

    def __init__(self, run_dir: str | Path, cfg: Config, read_only: bool = False,
                 kept: Sequence[int] | None = None):
        ocp = _ocp()
        self.run_dir, self.cfg = Path(run_dir), cfg
        # Steps saved before a resume stay permanent under the rule they were saved with, even if this
        # run's checkpoint.every differs (Orbax applies the policy to them on the first save). ``kept``:
        # those steps, when the caller has them already (``ResumePlan.kept``); None: read them here.
        if kept is None:
            kept = [] if read_only else permanent_steps(run_dir)
        self.policy = KeepPolicy(cfg.checkpoint.every, cfg.checkpoint.keep_last, mandatory_steps(cfg), kept)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=self.policy,
            enable_async_checkpointing=cfg.checkpoint.async_save,
            cleanup_tmp_directories=not read_only,  # the leftovers of a save killed half-way
            create=not read_only,
            read_only=read_only,
        )
        # A save that fails in Orbax's threads logs pages of tracebacks there; they go to
        # RUN_DIR/orbax_errors.log, and the run says what failed in one line (CheckpointError).
        self._quiet = contextlib.ExitStack()
        if not read_only:
            self._quiet.enter_context(orbax_noise.captured(self.run_dir / orbax_noise.LOG_NAME))
        self._mngr = ocp.CheckpointManager(checkpoints_dir(run_dir).resolve(), options=options)
        self.last_saved: int | None = None
        self.failed: CheckpointError | None = None  # a save that failed (reported once)
        self._multiprocess = jax.process_count() > 1
        self._pool = None  # one worker thread, made on the first asynchronous save
        self._pending = None  # its Future: the Orbax save call of the newest snapshot
        self._last_read = None  # (OpenStep, state tree, data item) of the last restore

    # -- saving

    def save(self, step: int, state, *, data_state: dict | None, resumables: dict | None = None) -> None:
        """Starts saving ``state`` (a TrainState on device) as ``step``. ``data_state`` is this process's
        loader state (every process's is stored); ``resumables`` are asked for ``state_dict()`` now."""
        meta = {
            "format": FORMAT,
            "step": int(step),
            "tokens_seen": int(step) * self.cfg.tokens_per_step,
            "total_steps": self.cfg.train.steps,
            "config": self.cfg.to_dict(),
            "resumables": {name: obj.state_dict() for name, obj in (resumables or {}).items()},
            "permanent": self.policy.is_save_step(int(step)),  # kept forever, whatever a resume changes
            "saved_at": time.time(),
        }
        data = {"format": FORMAT, "processes": gather_json(data_state)}  # a collective: main thread
        tree = to_tree(state)
        if self.cfg.checkpoint.async_save:
            self._finish_pending(step)  # bounds memory to one snapshot in transfer plus Orbax's write
            # A private device copy, dispatched async; the explicit shardings make it valid for arrays
            # spread over several processes too.
            tree = jax.device_put(tree, jax.tree.map(lambda x: x.sharding, tree), may_alias=False)
        # Several processes: Orbax's save call runs cross-process collectives, which must be issued in
        # the same order on every process; from a background thread they would interleave with the
        # train step's collectives differently on each (gloo aborts on the mismatch). So the call stays
        # on the main thread there (Orbax still writes the files in the background).
        if self.cfg.checkpoint.async_save and jax.process_count() == 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bitnet-checkpoint")
            # The checksum of the private copy (no step donates it) is computed in that thread too.
            self._pending = self._pool.submit(self._save_call, step, tree, data, meta, wait_for_write=True)
        else:
            # A collective over a sharded state: on the main thread, in the same order on every process.
            try:
                self._save_call(step, tree, data, meta, state_checksum.array_hashes(tree))
            except Exception as e:
                raise self._failure(e, step) from e
        self.last_saved = int(step)

    def _save_call(self, step: int, tree: dict, data: dict, meta: dict, hashes: dict | None = None,
                   wait_for_write: bool = False) -> None:
        """Orbax's save call of one snapshot, its checksum (``hashes`` when dispatched already; waited
        for here) in the meta item."""
        ocp = _ocp()
        if hashes is None:
            hashes = state_checksum.array_hashes(tree)
        meta = {**meta, "checksum": state_checksum.record(state_checksum.fetch(hashes), data, meta)}
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(tree),
            DATA: ocp.args.JsonSave(data),
            META: ocp.args.JsonSave(meta),
        })
        self._mngr.save(step, args=args, force=True)
        if wait_for_write:
            # In the save thread: wait for Orbax's file writes too, so that the thread's Future carries
            # their outcome and a write that fails (a full disk, a folder that cannot be written) is
            # seen by the next step's check_background_errors. (Orbax's save of the next step would
            # wait for them anyway.)
            self._mngr.wait_until_finished()

    def _finish_pending(self, step: int) -> None:
        """Waits for the background save of the newest snapshot; raises CheckpointError if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as e:
                raise self._failure(e, step) from e

    def _failure(self, error: Exception, step: int) -> CheckpointError:
        """The one message of a failed save (recorded: ``close`` does not raise it again)."""
        if self.failed is None:
            self.failed = CheckpointError(
                f"saving a checkpoint to {checkpoints_dir(self.run_dir)} failed: {failure_cause(error)}. The run "
                f"stopped at step {step}; complete checkpoints: {complete_steps(self.run_dir) or 'none'}. Fix the "
                f"cause (disk space, permissions), then resume (Orbax's log: {self.run_dir / orbax_noise.LOG_NAME})")
        return self.failed

    def check_background_errors(self, step: int) -> None:
        """Raises, without waiting, the error of a background save that has already failed (a full
        disk, a lost mount): checked every step, so the run stops at once, not at the next save
        minutes later; an exception in flight would otherwise also cost the save on SIGTERM."""
        if self._pending is not None and self._pending.done():
            self._finish_pending(step)
        try:
            self._mngr.check_for_errors()
        except Exception as e:
            raise self._failure(e, step) from e

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        step = self.last_saved if self.last_saved is not None else -1
        self._finish_pending(step)
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise self._failure(e, step) from e

    def close(self) -> None:
        """Waits for started saves and shuts down. Raises CheckpointError for a save that failed and
        was not reported yet; a failure already raised is not raised again (Orbax would re-raise it
        here, over the message that explains it)."""
        reported = self.failed
        try:
            self.wait()
        except CheckpointError:
            if reported is None:
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            try:
                self._mngr.close()
            except Exception:  # the failure above, raised once more by Orbax: reported already
                if self.failed is None:
                    raise
            finally:
                self._quiet.close()

    def reached_preemption(self, step: int) -> bool:
        """Multi-process runs: whether JAX's distributed runtime saw a preemption notice (SIGTERM);
        all processes agree on the step. Single-process runs use ``resume.StopRequest``."""
        return self._multiprocess and self._mngr.reached_preemption(step)

    # -- restoring

    def verify_last_restore(self) -> None:
        """``OpenStep.verify`` of what the last ``restore`` read (several processes: on every process,
        once every process has read without an error)."""
        opened, tree, data = self._last_read
        opened.verify(tree, data)

    def restore(self, step: int, like, shardings=None, opened: OpenStep | None = None,
                verify: bool = True) -> tuple[Any, list, dict]:
        """Restores ``step`` into the structure, shapes and shardings of ``like`` (a TrainState, real or
        abstract; ``shardings`` a matching tree of shardings). Returns (state, data_states, meta):
        the loader state of every process that saved (in process order), the stored metadata.
        ``opened``: the step as ``open_step`` validated it (else it is opened here, never replaced).
        ``verify``: compare with the stored checksum (``OpenStep.verify``); several processes call it
        themselves once all have read (``resume._restore_on_every_process``)."""
        ocp = _ocp()
        opened = opened or open_step(self.run_dir, step, fallback=False, resuming=True)
        target = abstract_tree(like, shardings)
        opened.check_fits(target)
        # meta/ is not read again: open_step parsed it.
        out = opened.read_files(lambda: self._mngr.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(target),
            DATA: ocp.args.JsonRestore(),
        })))
        data = dict(out[DATA])
        self._last_read = opened, out[STATE], data
        if verify:
            self.verify_last_restore()
        return from_tree(out[STATE], like), list(data.get("processes") or []), opened.meta


# --------------------------------------------------------------------------- reading params only

def read_params(opened: OpenStep):
    """``(cfg, params, step)`` of ``opened``: its stored config and the model parameters only (not the
    optimizer state), an ``nnx.State`` matching ``nnx.split(BitNetLM(cfg.model, ...), nnx.Param)[1]``
    with float32 arrays on this process's first device."""
    ocp = _ocp()
    cfg = opened.cfg
    like = abstract_model(cfg.model)[1]
    target = {"params": abstract_tree(like)}
    opened.check_fits(target, partial=True)
    # local: jax.devices()[0] belongs to process 0 and is not addressable from the others
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = opened.read_files(lambda: ocp.PyTreeCheckpointer().restore(
        opened.path / STATE,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=device), target),
            partial_restore=True,
        ),
    ))
    opened.verify({"params": restored["params"]})  # the params' checksums (and the meta item's)
    return cfg, from_tree(restored["params"], like), opened.step


def load_params(run_dir: str | Path, step: int | None = None):
    """The resolved config, the model parameters and the step of a checkpoint: ``(cfg, params, step)``
    (see ``read_params``). ``step=None`` takes the newest complete step, and an older one once if its
    files are damaged (``OpenStep.read``); nothing is moved."""
    return open_step(run_dir, step).read(read_params)

