"""Checkpoints: Orbax ``CheckpointManager`` steps under ``RUN_DIR/checkpoints/<step>/``.

One step directory holds three Orbax items (``ocp.args.Composite``)::

    state/   StandardSave: {"step", "key", "params", "opt_state"} as plain nested dicts of arrays
             (params: ``nnx.State.to_pure_dict()`` layout, e.g. params/layers/0/mlp/down_proj/weight)
    data/    JsonSave: {"format", "processes": [data-loader state of process 0, 1, ...]}
    meta/    JsonSave: {"format", "step", "tokens_seen", "total_steps", "config" (resolved, as a dict),
             "resumables": {name: state_dict()}, "permanent" (an every-N or mandatory step: kept
             forever, whatever a resume changes), "saved_at" (unix time)}

Saves are asynchronous (the train loop is blocked only to enqueue an on-device copy of the state;
the device-to-host transfer and the file writes run in background threads) and atomic:
Orbax writes ``<step>.orbax-checkpoint-tmp*`` and renames it to ``<step>`` after writing
``commit_success.txt``, so a directory named by a bare integer is complete unless damaged later.
Per-step randomness is ``fold_in(key, step)``, so the stored base key and step are all the PRNG
state there is.

Public API::

    complete_steps(run_dir) -> [step, ...]            # sorted, structurally complete steps
    CheckpointDamaged                                 # a step whose files cannot be read back
    load_params(run_dir, step=None) -> (cfg, params, step)
    CheckpointManager(run_dir, cfg)                   # the train loop's saver / restorer
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bitnet_jax import config as config_lib
from bitnet_jax.config import Config, ConfigError
from bitnet_jax.hooks import Hook

FORMAT = "bitnet_jax.checkpoint/1"
STATE, DATA, META = "state", "data", "meta"  # the Composite's item names (= sub-folder names)
COMMIT_FILE = "commit_success.txt"  # written by Orbax right before the atomic rename


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message says which and what to do."""


class CheckpointDamaged(CheckpointError):
    """The files of one step cannot be read back: a file is missing or truncated, or a JSON / OCDBT /
    zstd decode fails (see ``damage_reason``). Only this error lets ``--resume latest`` (and
    ``load_params(step=None)``) fall back to an older step, and only a step that raised it is moved
    aside. Anything else (out of memory, a sharding mismatch, a transient file-system error, a bug) is
    re-raised as it is and leaves the checkpoint alone."""

    def __init__(self, step_dir: str | Path, reason: str):
        self.step_dir, self.reason = Path(step_dir), reason
        super().__init__(f"checkpoint {step_dir} is damaged and cannot be read ({reason})")


# --------------------------------------------------------------------------- paths and completeness

def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_problem(step_dir: Path) -> str | None:
    """Why ``step_dir`` is not a usable checkpoint (missing or unreadable files), or None.

    A structural check that reads only small metadata files: an unfinished save (no commit file),
    a deleted item, a truncated or corrupt JSON file. Damage inside array data files shows up when
    the arrays are read (``restore`` then names the step)."""
    if not step_dir.is_dir():
        return "not a directory"
    if not (step_dir / COMMIT_FILE).is_file():
        return f"no {COMMIT_FILE} (the save never finished)"
    for name, must_parse in (("_CHECKPOINT_METADATA", True),
                             (f"{STATE}/_METADATA", True), (f"{STATE}/manifest.ocdbt", False),
                             (f"{DATA}/metadata", True), (f"{META}/metadata", True)):
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size == 0:
            return f"{name} is empty"
        if must_parse:
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                return f"{name} is truncated or corrupt (not valid JSON)"
    return None


# What Orbax 0.12 / tensorstore 0.1 raise for damaged files (found by damaging real steps):
#   a JSON file (state/_METADATA, state/array_metadatas/*, data/ or meta/metadata) truncated or garbled:
#       json.JSONDecodeError;  data/ or meta/metadata deleted: FileNotFoundError
#   state/manifest.ocdbt deleted: ValueError("NOT_FOUND: ... does not exist");  truncated or garbled:
#       ValueError("DATA_LOSS: ... Error decoding local file ...")
#   a b-tree file under state/d/ deleted: ValueError("NOT_FOUND: ..."); truncated: ValueError("OUT_OF_RANGE:
#       ... Requested byte range ... is not valid ..."); garbled: ValueError("DATA_LOSS: ...") or, with no
#       status prefix, ValueError("... Error decoding b-tree node: ZSTD_decompressStream() failed: Data
#       corruption detected ...")
#   an array data file under state/ocdbt.process_*/d/ deleted, emptied or zeroed: Exception("Encountered
#       error while reading array index ...") whose context is ValueError("FAILED_PRECONDITION: ...
#       Truncated Zstd-compressed stream" / "ZSTD_decompressStream() failed: Unknown frame descriptor")
#       or ValueError("OUT_OF_RANGE: ... Requested byte range ... is not valid for value of size N");
#       truncated: the same OUT_OF_RANGE.
# (Bytes flipped inside a compressed array chunk go unnoticed: zstd frames carry no checksum here.)
# tensorstore reports every failure as a ValueError whose message starts with the absl status code
# (all but INVALID_ARGUMENT, which has none), so the code, and for INVALID_ARGUMENT the decoder's words,
# are the only way to tell damage from e.g. RESOURCE_EXHAUSTED or UNAVAILABLE.
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
_DECODE_FAILURES = ("Error decoding", "ZSTD_decompressStream() failed", "Truncated Zstd-compressed stream",
                    "Data corruption detected")
_OTHER_CODES = ("CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "ABORTED", "UNIMPLEMENTED", "INTERNAL",
                "UNAVAILABLE", "UNAUTHENTICATED")


def damage_reason(error: BaseException, step_dir: str | Path) -> str | None:
    """Why ``error``, raised while reading ``step_dir``, shows that the step's files are damaged; None
    when it does not (then it is someone else's problem and must not cost the checkpoint).

    Looks through Orbax's generic ``Exception`` wrappers to the error they wrap, never past any other
    type: a RuntimeError("RESOURCE_EXHAUSTED ...") stays an out-of-memory error whatever it wraps."""
    if not Path(step_dir).is_dir():
        return None  # the step vanished under us (moved by someone): not damage of its files
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not x for x in seen) and len(seen) < 8:
        seen.append(e)
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            return f"a JSON file is truncated or corrupt: {_first_line(e)}"
        if isinstance(e, FileNotFoundError):
            return f"a file is missing: {_first_line(e)}"
        if type(e) is ValueError:
            text = str(e)
            code = text.split(":", 1)[0].strip()
            if code in _OTHER_CODES:
                return None
            if code in _DAMAGE_CODES or any(phrase in text for phrase in _DECODE_FAILURES):
                return _first_line(e)
            return None
        if type(e) is not Exception:
            return None
        e = e.__cause__ or e.__context__
    return None


def _not_damage_note(error: BaseException, step_dir: Path) -> None:
    error.add_note(f"(raised while restoring checkpoint {step_dir}; this is not damage to its files, "
                   "so the checkpoint was left in place: fix the cause and resume again)")


def _read_step(step_dir: Path, read, what: str = ""):
    """``read()``, an Orbax read of ``step_dir``: damaged files raise ``CheckpointDamaged``; any other
    error is re-raised as it is, with a note that the checkpoint was left in place."""
    reason = None
    try:
        return read()
    except Exception as e:
        reason = damage_reason(e, step_dir)
        if reason is None:
            _not_damage_note(e, step_dir)
            raise
    # Raised outside the handler, so the failed read's frames (and arrays) are freed.
    raise CheckpointDamaged(step_dir, what + reason)


def _step_dirs(run_dir: str | Path) -> dict[int, Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return {}
    return {int(p.name): p for p in root.iterdir() if p.name.isdigit()}


def step_problems(run_dir: str | Path) -> dict[int, str | None]:
    """Every step directory (bare integer name), sorted: step -> its ``step_problem`` (None: complete)."""
    return {step: step_problem(path) for step, path in sorted(_step_dirs(run_dir).items())}


def complete_steps(run_dir: str | Path, warn: bool = False) -> list[int]:
    """Sorted steps of ``run_dir`` whose directories are complete; with ``warn``, each skipped one
    is named in a warning."""
    out = []
    for step, problem in step_problems(run_dir).items():
        if problem is None:
            out.append(step)
        elif warn:
            warnings.warn(f"skipping checkpoint {checkpoints_dir(run_dir) / str(step)}: {problem}", stacklevel=2)
    return out


def read_meta(step_dir: str | Path) -> dict:
    """The ``meta`` item of a step directory (plain JSON; Orbax's JsonSave writes ``meta/metadata``)."""
    path = Path(step_dir) / META / "metadata"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir} is not a bitnet-jax checkpoint: {path} is missing") from None
    except ValueError:
        raise CheckpointError(f"{path} is truncated or corrupt; use another step") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir} was written as {meta.get('format')!r}, this version reads {FORMAT!r}")
    return meta


def read_config(step_dir: str | Path) -> Config:
    """The resolved config stored with a checkpoint."""
    try:
        return config_lib.from_dict(read_meta(step_dir)["config"])
    except ConfigError as e:
        raise CheckpointError(f"the config stored in {step_dir} is not valid for this version: {e}") from None


# --------------------------------------------------------------------------- train state <-> plain tree

def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _unwrap(tree):
    """nnx Variables -> their arrays (so key paths stop at the parameter name)."""
    import jax

    return jax.tree.map(lambda v: v.get_value() if _is_variable(v) else v, tree, is_leaf=_is_variable)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unexpected pytree key {k!r}")


def _paths(tree) -> tuple[list[tuple[str, ...]], list[Any]]:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(_unwrap(tree))
    return [tuple(_key_name(k) for k in path) for path, _ in flat], [leaf for _, leaf in flat]


def to_tree(state) -> dict:
    """A TrainState (or any pytree) as nested dicts keyed by field / parameter names, the layout stored
    in ``state/``: {"step", "key", "params": {...}, "opt_state": {"1": {"count", "mu", "nu"}}}."""
    out: dict = {}
    for path, leaf in zip(*_paths(state)):
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return out


def from_tree(tree: dict, like):
    """Inverse of ``to_tree``: the values of ``tree`` in the structure of ``like``."""
    import jax

    paths, _ = _paths(like)
    leaves = []
    for path in paths:
        node = tree
        for part in path:
            node = node[part]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_shapes(stored: dict, expected: dict, where: str) -> None:
    """Raises a CheckpointError naming the first entry whose shape or dtype differs (both trees hold
    objects with ``.shape`` and ``.dtype``: arrays, ShapeDtypeStructs or Orbax array metadata)."""
    fs, fe = _flat(stored), _flat(expected)
    for name in sorted(fe, key=lambda n: not n.startswith("params.")):  # name a parameter if one differs
        if name not in fs:
            raise CheckpointError(f"{where} has no entry {name}: it was saved from a different model or "
                                  "optimizer; check model.* (and optim.*) against the checkpoint's config")
        s, e = fs[name], fe[name]
        if tuple(s.shape) != tuple(e.shape) or np.dtype(s.dtype) != np.dtype(e.dtype):
            raise CheckpointError(
                f"{where} does not match the model: {name} is {tuple(s.shape)} {np.dtype(s.dtype)} in the "
                f"checkpoint but {tuple(e.shape)} {np.dtype(e.dtype)} in the model; use the checkpoint's "
                "model.* settings (its config is stored in meta/metadata)")
    extra = sorted(set(fs) - set(fe))
    if extra:
        raise CheckpointError(f"{where} holds {extra[0]} which the model does not have; use the checkpoint's "
                              "model.* settings (its config is stored in meta/metadata)")


# --------------------------------------------------------------------------- what to keep

class KeepPolicy:
    """Orbax preservation policy: keep forever the ``mandatory`` steps, every multiple of ``every`` and
    the ``kept`` steps (those permanent under the config they were saved with, see
    ``permanent_steps``); of the other steps keep the newest ``keep_last``; never delete the newest
    step of all (so a SIGTERM save with keep_last=0 still survives).

    Orbax applies the policy to every step of the folder, the ones saved before a resume included; so
    a resume that changes ``checkpoint.every`` must pass the old permanent steps as ``kept``."""

    def __init__(self, every: int, keep_last: int, mandatory: Sequence[int] = (), kept: Sequence[int] = ()):
        self.every, self.keep_last, self.mandatory = every, keep_last, set(mandatory)
        self.kept = set(kept)

    def is_permanent(self, step: int) -> bool:
        return step in self.kept or self.is_save_step(step)

    def is_save_step(self, step: int) -> bool:
        """Permanent under this policy's own rule (what ``meta["permanent"]`` records)."""
        return step in self.mandatory or (self.every > 0 and step % self.every == 0)

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        keep = [self.is_permanent(c.step) for c in checkpoints]
        others = [i for i, c in enumerate(checkpoints) if not keep[i]]
        for i in others[len(others) - self.keep_last:] if self.keep_last else []:
            keep[i] = True
        if checkpoints:
            keep[max(range(len(checkpoints)), key=lambda i: checkpoints[i].step)] = True
        return keep


def mandatory_steps(cfg: Config) -> list[int]:
    """Steps always saved and kept: both sides of the stage switch, and the final step."""
    return sorted({s for s in (cfg.stage_switch - 1, cfg.stage_switch, cfg.train.steps) if s > 0})


def permanent_steps(run_dir: str | Path) -> list[int]:
    """The steps of ``run_dir`` that were permanent (every-N or mandatory) under the config they were
    saved with: ``meta["permanent"]``, else (steps written before that field existed) the rule of the
    config stored in the step. A step whose meta cannot be read counts as permanent: the policy
    never deletes what it cannot judge."""
    out = []
    for step, path in sorted(_step_dirs(run_dir).items()):
        try:
            meta = read_meta(path)
            permanent = meta.get("permanent")
            if permanent is None:
                stored = config_lib.from_dict(meta["config"])
                permanent = is_save_step(stored, step)
        except Exception:  # damaged or from another version: keep it (fail safe: costs disk, not data)
            permanent = True
        if permanent:
            out.append(step)
    return out


def is_save_step(cfg: Config, step: int) -> bool:
    return KeepPolicy(cfg.checkpoint.every, 0, mandatory_steps(cfg)).is_save_step(step)


def save_hook(cfg: Config, fn) -> Hook:
    """The train loop's checkpoint hook: due at multiples of ``checkpoint.every`` and at the
    mandatory steps (``mandatory_steps``, the final step among them); ``fn(step)`` saves."""
    return Hook("checkpoint", cfg.checkpoint.every, fn, at_end=False, timing_tag="time/checkpoint_ms",
                steps=frozenset(mandatory_steps(cfg)))


# --------------------------------------------------------------------------- multi-process JSON

def gather_json(obj) -> list:
    """Every process's ``obj`` (JSON-able), in process order; a collective when several processes run."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]


# --------------------------------------------------------------------------- the manager

def _ocp():
    import orbax.checkpoint as ocp

    # Orbax logs every save at INFO through absl; keep the console for the progress bar.
    # ERROR: it also warns that item folders lack a _CHECKPOINT_METADATA file, which is by design.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


class CheckpointManager:
    """Saves and restores the steps of one run directory (see the module docstring).

    With ``checkpoint.async_save`` (the default) ``save`` blocks the loop only to enqueue an on-device
    copy of the state; a background thread hands that private copy to Orbax, whose device-to-host
    transfer (synchronous inside Orbax: hundreds of ms for the 95M state on an H100) then overlaps
    the next train steps, which are free to donate the original buffers. Orbax writes the files in
    its own background thread. At most one snapshot waits behind the save in progress. ``wait``
    blocks until the newest save is on disk; call ``close`` at the end (it waits too)."""

    def __init__(self, run_dir: str | Path, cfg: Config, read_only: bool = False):
        import jax

        ocp = _ocp()
        self.run_dir, self.cfg = Path(run_dir), cfg
        # Steps saved before a resume stay permanent under the rule they were saved with, even if this
        # run's checkpoint.every differs (Orbax applies the policy to them on the first save).
        kept = [] if read_only else permanent_steps(run_dir)
        self.policy = KeepPolicy(cfg.checkpoint.every, cfg.checkpoint.keep_last, mandatory_steps(cfg), kept)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=self.policy,
            enable_async_checkpointing=cfg.checkpoint.async_save,
            cleanup_tmp_directories=not read_only,  # the leftovers of a save killed half-way
            create=not read_only,
            read_only=read_only,
        )
        self._mngr = ocp.CheckpointManager(checkpoints_dir(run_dir).resolve(), options=options)
        self.last_saved: int | None = None
        self._multiprocess = jax.process_count() > 1
        self._pool = None  # one worker thread, made on the first asynchronous save
        self._pending = None  # its Future: the Orbax save call of the newest snapshot

    # -- saving

    def save(self, step: int, state, *, data_state: dict | None, resumables: dict | None = None) -> None:
        """Starts saving ``state`` (a TrainState on device) as ``step``. ``data_state`` is this process's
        loader state (every process's is stored); ``resumables`` are asked for ``state_dict()`` now."""
        import jax

        ocp = _ocp()
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
            self._finish_pending()  # bounds memory to one snapshot in transfer plus Orbax's write
            # A private device copy, dispatched async; the explicit shardings make it valid for arrays
            # spread over several processes too.
            tree = jax.device_put(tree, jax.tree.map(lambda x: x.sharding, tree), may_alias=False)
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(tree),
            DATA: ocp.args.JsonSave(data),
            META: ocp.args.JsonSave(meta),
        })
        # Several processes: Orbax's save call runs cross-process collectives, which must be issued in
        # the same order on every process; from a background thread they would interleave with the
        # train step's collectives differently on each (gloo aborts on the mismatch). So the call stays
        # on the main thread there (Orbax still writes the files in the background).
        if self.cfg.checkpoint.async_save and jax.process_count() == 1:
            if self._pool is None:
                import concurrent.futures

                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bitnet-checkpoint")
            self._pending = self._pool.submit(self._mngr.save, step, args=args, force=True)
        else:
            self._mngr.save(step, args=args, force=True)
        self.last_saved = int(step)

    def _finish_pending(self) -> None:
        """Waits for the background Orbax save call (not its file writes); re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def check_background_errors(self, step: int) -> None:
        """Raises, without waiting, the error of a background save that has already failed (a full
        disk, a lost mount): checked every step, so the run stops at once, not at the next save
        minutes later; an exception in flight would otherwise also cost the save on SIGTERM."""
        try:
            if self._pending is not None and self._pending.done():
                self._finish_pending()
            self._mngr.check_for_errors()
        except Exception as e:
            raise CheckpointError(
                f"saving a checkpoint failed in the background ({type(e).__name__}: {_first_line(e)}); the run "
                f"stops at step {step}. Complete checkpoints: {complete_steps(self.run_dir) or 'none'}; fix the "
                f"cause (disk space, permissions) and resume") from e

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._finish_pending()
        self._mngr.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._mngr.close()

    def reached_preemption(self, step: int) -> bool:
        """Multi-process runs: whether JAX's distributed runtime saw a preemption notice (SIGTERM);
        all processes agree on the step. Single-process runs use ``resume.StopRequest``."""
        return self._multiprocess and self._mngr.reached_preemption(step)

    # -- restoring

    def restore(self, step: int, like, shardings=None) -> tuple[Any, list, dict]:
        """Restores ``step`` into the structure, shapes and shardings of ``like`` (a TrainState, real or
        abstract; ``shardings`` a matching tree of shardings). Returns (state, data_states, meta):
        the loader state of every process that saved (in process order), the stored metadata."""
        ocp = _ocp()
        step_dir = checkpoints_dir(self.run_dir) / str(step)
        problem = step_problem(step_dir)
        if problem:
            raise CheckpointError(f"checkpoint {step_dir} cannot be restored: {problem}; "
                                  f"complete steps of this run: {complete_steps(self.run_dir) or 'none'}")
        target = _abstract_tree(like, shardings)
        check_shapes(_stored_state_metadata(step_dir), target, f"checkpoint {step_dir}")
        out = _read_step(step_dir, lambda: self._mngr.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(target),
            DATA: ocp.args.JsonRestore(),
            META: ocp.args.JsonRestore(),
        })))
        meta, data = dict(out[META]), dict(out[DATA])
        return from_tree(out[STATE], like), list(data.get("processes") or []), meta


def _abstract_tree(like, shardings=None) -> dict:
    import jax

    tree = to_tree(like)
    sh = to_tree(shardings) if shardings is not None else jax.tree.map(lambda _: None, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)


def check_fits(step_dir: str | Path, cfg: Config) -> None:
    """Raises a CheckpointError naming the first parameter (or optimizer entry) of the checkpoint
    whose shape differs from the train state ``cfg`` builds. Reads metadata only; no compute."""
    from bitnet_jax.train_state import abstract_state

    _, abstract = abstract_state(cfg)
    check_shapes(_stored_state_metadata(Path(step_dir)), _abstract_tree(abstract), f"checkpoint {step_dir}")


def _stored_state_metadata(step_dir: Path) -> dict:
    """The stored state's tree of array metadata (shape, dtype), read from ``state/_METADATA`` and the
    arrays' zarr headers inside the OCDBT database (so a damaged database shows up here already)."""
    ocp = _ocp()
    # The handler, not StandardCheckpointer().metadata: that one logs read errors and returns None.
    meta = _read_step(step_dir, lambda: ocp.StandardCheckpointHandler().metadata(step_dir / STATE),
                      f"reading the metadata of {STATE}/: ")
    tree = getattr(meta, "tree", meta)
    if not isinstance(tree, dict):
        raise CheckpointError(f"checkpoint {step_dir}: Orbax returned no array metadata for {STATE}/ "
                              f"(got {type(tree).__name__}); it was not written by this version")
    return dict(tree)


# --------------------------------------------------------------------------- reading params only

def abstract_model(model_cfg):
    """``(graphdef, params)`` of a ``BitNetLM`` for ``model_cfg``, shapes only (nothing allocated)."""
    from flax import nnx

    from bitnet_jax.model import BitNetLM

    model = nnx.eval_shape(lambda: BitNetLM(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def _params_like(cfg: Config):
    return abstract_model(cfg.model)[1]


def resolve_step(run_dir: str | Path, step: int | None) -> int:
    """``step`` if it is a complete step of ``run_dir``; None: the newest complete one (damaged newer
    directories are skipped with a warning naming them)."""
    run_dir = Path(run_dir)
    if not checkpoints_dir(run_dir).is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoints/ folder; give a run directory made by train.py")
    if step is None:
        steps = complete_steps(run_dir, warn=True)
        if not steps:
            raise CheckpointError(f"{checkpoints_dir(run_dir)} holds no complete checkpoint")
        return steps[-1]
    step_dir = checkpoints_dir(run_dir) / str(step)
    if not step_dir.is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoint at step {step}; "
                              f"complete steps: {complete_steps(run_dir) or 'none'}")
    problem = step_problem(step_dir)
    if problem:
        raise CheckpointError(f"checkpoint {step_dir} is incomplete or damaged: {problem}; "
                              f"complete steps: {complete_steps(run_dir) or 'none'}")
    return step


def load_params(run_dir: str | Path, step: int | None = None):
    """The resolved config, the model parameters and the step of a checkpoint.

    Returns ``(cfg, params, step)``; ``params`` is an ``nnx.State`` matching
    ``nnx.split(BitNetLM(cfg.model, rngs=...), nnx.Param)[1]`` with float32 host-default-device arrays.
    ``step=None`` takes the newest complete step; when its files turn out to be damaged
    (``CheckpointDamaged``) the next older one is tried once, with a warning naming the damaged one;
    a second damaged step raises, naming the steps to pass. Other errors (out of memory, ...) are
    raised as they are. Only the params are read, not the optimizer state; nothing is moved."""
    run_dir = Path(run_dir)
    explicit = step is not None
    s = resolve_step(run_dir, step)
    try:
        return _load_params_of(run_dir, s)
    except CheckpointDamaged as e:
        older = [t for t in complete_steps(run_dir) if t < s]
        if explicit or not older:
            raise
        first = e
    warnings.warn(f"skipping damaged checkpoint {first.step_dir} ({first.reason}); "
                  f"trying step {older[-1]}", stacklevel=2)
    try:
        return _load_params_of(run_dir, older[-1])
    except CheckpointDamaged as e:
        raise CheckpointDamaged(e.step_dir, f"{e.reason}; the newer {first.step_dir} is damaged too. Not "
                                "trying further steps on my own: pass the step to read explicitly (older "
                                f"complete steps: {[t for t in older if t < older[-1]] or 'none'})") from None


def _load_params_of(run_dir: Path, s: int):
    import jax

    ocp = _ocp()
    step_dir = checkpoints_dir(run_dir) / str(s)
    cfg = read_config(step_dir)
    like = _params_like(cfg)
    target = _abstract_tree(like)
    check_shapes({"params": _stored_state_metadata(step_dir)["params"]}, {"params": target},
                 f"checkpoint {step_dir}")
    restored = _read_step(step_dir, lambda: ocp.PyTreeCheckpointer().restore(
        step_dir / STATE,
        args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=_default_sharding()),
                                      {"params": target}),
            partial_restore=True,
        ),
    ))
    return cfg, from_tree(restored["params"], like), s


def _first_line(e: BaseException) -> str:
    """Tensorstore errors append a page of JSON spec; the first line says what failed."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}"


def _default_sharding():
    import jax

    from jax.sharding import SingleDeviceSharding

    # local: jax.devices()[0] belongs to process 0 and is not addressable from the others
    return SingleDeviceSharding(jax.local_devices()[0])
