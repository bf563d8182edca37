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

Every read of a step goes through ``open_step`` (open_step.py): it validates the step once and is
the one place where a damaged newest step gives way to the next older one; every restore here
compares what it read with the step's checksum (``OpenStep.verify``).

Public API::

    CheckpointManager(run_dir, cfg)                  # the train loop's saver / restorer
    read_params(opened) -> (cfg, params, step)       # the params of an opened step (open_step.py)
    load_params(run_dir, step=None) -> (cfg, params, step)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from bitnet_jax import orbax_noise, state_checksum
from bitnet_jax.config import Config
from bitnet_jax.damage import failure_cause
from bitnet_jax.distributed import gather_json
from bitnet_jax.model import abstract_model
from bitnet_jax.open_step import OpenStep, open_step
from bitnet_jax.run_dir import (DATA, FORMAT, META, STATE, CheckpointError, KeepPolicy, checkpoints_dir,
                                complete_steps, mandatory_steps, permanent_steps)
from bitnet_jax.state_tree import abstract_tree, from_tree, to_tree


# --------------------------------------------------------------------------- the manager

class CheckpointManager:
    """Saves and restores the steps of one run directory (see the module docstring).

    With ``checkpoint.async_save`` (the default) ``save`` blocks the loop only to enqueue an on-device
    copy of the state; a background thread hands that private copy to Orbax, whose device-to-host
    transfer (synchronous inside Orbax: hundreds of ms for the 95M state on an H100) then overlaps
    the next train steps, which are free to donate the original buffers. Orbax writes the files in
    its own background thread, and the save thread waits for those writes, so that a write that
    fails is seen at the next step. A save waits for the previous one to be on disk (one snapshot
    in flight at a time: seconds for the 95M state, against minutes between saves). ``wait`` blocks
    until the newest save is on disk; call ``close`` at the end (it waits too)."""

    def __init__(self, run_dir: str | Path, cfg: Config, read_only: bool = False,
                 kept: Sequence[int] | None = None):
        ocp = orbax_noise.orbax()
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
        ocp = orbax_noise.orbax()
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
        ocp = orbax_noise.orbax()
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
    ocp = orbax_noise.orbax()
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

