"""A run directory as files: its paths, its step folders, which of them are complete, their metadata
and config, and the steps the keep policy holds forever. Imports neither jax, Orbax nor flax, so
``status.py`` reads runs through it alone; ``checkpoint.py`` adds the Orbax reads and writes.

::

    RUN_DIR/
      config.yaml            the resolved config (rewritten by every start)
      tokenizer/  tb/        the run's tokenizer files; TensorBoard event files
      checkpoints/<step>/    one Orbax step (see checkpoint.py); <step>.orbax-checkpoint-tmp-*: a save
                             in progress (or cut off by kill -9)
      damaged_checkpoints/   steps moved out of the way by a resume, kept for inspection
      trainer.lock           the trainer that writes the run (run_lock.py); end.json: how it ended

A step folder named by a bare integer is complete unless damaged later: Orbax writes a tmp folder
and renames it after writing ``commit_success.txt``. ``scan_steps`` reads each step's small
metadata files once; everything else here works from that scan.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Sequence

from bitnet_jax import config as config_lib
from bitnet_jax.config import Config, ConfigError
from bitnet_jax.orbax_noise import CheckpointWarning  # one line on the console (stdlib only)

FORMAT = "bitnet_jax.checkpoint/1"
STATE, DATA, META = "state", "data", "meta"  # the Composite's item names (= sub-folder names)
COMMIT_FILE = "commit_success.txt"  # written by Orbax right before the atomic rename
CONFIG_FILE = "config.yaml"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message says which and what to do."""


class CheckpointDamaged(CheckpointError):
    """The files of one step cannot be read back: a file is missing or truncated, or a JSON / OCDBT /
    zstd decode fails (see ``damage.damage_reason``). Only this error lets a read of the newest
    step (``open_step.open_step``) fall back to an older step, and only a step that raised it is
    moved aside. Anything else (out of memory, a sharding mismatch, a transient file-system error, a
    bug) is re-raised as it is and leaves the checkpoint alone."""

    def __init__(self, step_dir: str | Path, reason: str):
        self.step_dir, self.reason = Path(step_dir), reason
        super().__init__(f"checkpoint {step_dir} is damaged and cannot be read ({reason})")


# --------------------------------------------------------------------------- paths

@dataclasses.dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return checkpoints_dir(self.root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def damaged(self) -> Path:
        return self.root / "damaged_checkpoints"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# --------------------------------------------------------------------------- step folders

@dataclasses.dataclass(frozen=True)
class SavedStep:
    """One step folder as found on disk: ``problem`` says why it is not a usable checkpoint (None:
    structurally complete); ``meta`` is its parsed ``meta/metadata`` (None when it has a problem)."""

    step: int
    path: Path
    problem: str | None
    meta: dict | None


def _parse_json(path: Path):
    """The one reader of a step's small JSON files (tests count its calls)."""
    return json.loads(path.read_text())


def inspect_step(step_dir: str | Path) -> SavedStep:
    """Reads the small metadata files of ``step_dir`` once (the arrays are not read).

    A structural check: an unfinished save (no commit file), a deleted item, a truncated or corrupt
    JSON file. Damage inside array data files shows up only when the arrays are read."""
    step_dir = Path(step_dir)
    step = int(step_dir.name) if step_dir.name.isdigit() else -1

    def problem(why: str) -> SavedStep:
        return SavedStep(step, step_dir, why, None)

    if not step_dir.is_dir():
        return problem("not a directory")
    if not (step_dir / COMMIT_FILE).is_file():
        return problem(f"no {COMMIT_FILE} (the save never finished)")
    meta = None
    for name, must_parse in (("_CHECKPOINT_METADATA", True),
                             (f"{STATE}/_METADATA", True), (f"{STATE}/manifest.ocdbt", False),
                             (f"{DATA}/metadata", True), (f"{META}/metadata", True)):
        path = step_dir / name
        if not path.is_file():
            return problem(f"{name} is missing")
        if path.stat().st_size == 0:
            return problem(f"{name} is empty")
        if must_parse:
            try:
                parsed = _parse_json(path)
            except (ValueError, UnicodeDecodeError):
                return problem(f"{name} is truncated or corrupt (not valid JSON)")
            if name.startswith(META):
                meta = parsed
    return SavedStep(step, step_dir, None, meta)


def _step_dirs(run_dir: str | Path) -> dict[int, Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return {}
    return {int(p.name): p for p in root.iterdir() if p.name.isdigit()}


def scan_steps(run_dir: str | Path) -> dict[int, SavedStep]:
    """Every step folder (bare integer name) of ``run_dir``, sorted by step, each inspected once."""
    return {step: inspect_step(path) for step, path in sorted(_step_dirs(run_dir).items())}


def complete_steps(run_dir: str | Path, warn: bool = False,
                   scan: dict[int, SavedStep] | None = None) -> list[int]:
    """Sorted steps of ``run_dir`` whose folders are complete (what ``--resume latest`` picks from);
    with ``warn``, each skipped one is named in a warning. ``scan``: a ``scan_steps`` already made."""
    out = []
    for step, saved in (scan_steps(run_dir) if scan is None else scan).items():
        if saved.problem is None:
            out.append(step)
        elif warn:
            warnings.warn(f"skipping checkpoint {saved.path}: {saved.problem}", CheckpointWarning, stacklevel=2)
    return out


# --------------------------------------------------------------------------- metadata and config

def check_meta(meta: dict, step_dir: str | Path) -> dict:
    """``meta`` (a step's parsed ``meta/metadata``) if this version can read it."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        written = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{step_dir} was written as {written!r}, this version reads {FORMAT!r}")
    return meta


def read_meta(step_dir: str | Path) -> dict:
    """The ``meta`` item of a step folder (plain JSON; Orbax's JsonSave writes ``meta/metadata``)."""
    path = Path(step_dir) / META / "metadata"
    try:
        meta = _parse_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir} is not a bitnet-jax checkpoint: {path} is missing") from None
    except ValueError:
        raise CheckpointError(f"{path} is truncated or corrupt; use another step") from None
    return check_meta(meta, step_dir)


def config_of(meta: dict, step_dir: str | Path) -> Config:
    """The resolved config stored in a step's (checked) metadata."""
    try:
        return config_lib.from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"the config stored in {step_dir} is not valid for this version: {e}") from None


def read_config(step_dir: str | Path) -> Config:
    """The resolved config stored with a checkpoint."""
    return config_of(read_meta(step_dir), step_dir)


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


def is_save_step(cfg: Config, step: int) -> bool:
    return KeepPolicy(cfg.checkpoint.every, 0, mandatory_steps(cfg)).is_save_step(step)


def permanent_steps(run_dir: str | Path, scan: dict[int, SavedStep] | None = None) -> list[int]:
    """The steps of ``run_dir`` that were permanent (every-N or mandatory) under the config they were
    saved with: ``meta["permanent"]``, else (steps written before that field existed) the rule of the
    config stored in the step. A step whose meta cannot be read counts as permanent: the policy
    never deletes what it cannot judge. ``scan``: a ``scan_steps`` already made."""
    out = []
    for step, saved in (scan_steps(run_dir) if scan is None else scan).items():
        try:
            meta = check_meta(saved.meta, saved.path)
            permanent = meta.get("permanent")
            if permanent is None:
                permanent = is_save_step(config_lib.from_dict(meta["config"]), step)
        except Exception:  # damaged or from another version: keep it (fail safe: costs disk, not data)
            permanent = True
        if permanent:
            out.append(step)
    return out


def save_steps_text(cfg: Config) -> str:
    """Which steps ``cfg``'s run saves, in words: 'every 5 steps (5, 10, ...), at the stage switch
    (9 and 10) and at the end (20)'."""
    every = cfg.checkpoint.every
    parts = [f"every {every} steps ({every}, {2 * every}, ...)"] if 0 < every < cfg.train.steps else []
    switch = [s for s in (cfg.stage_switch - 1, cfg.stage_switch) if 0 < s < cfg.train.steps]
    if switch:
        parts.append(f"at the stage switch ({' and '.join(map(str, switch))})")
    parts.append(f"at the end ({cfg.train.steps})")
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


# --------------------------------------------------------------------------- choosing a step

def _start_afresh(paths: RunPaths) -> str:
    """What to do when a run has nothing to resume from: start it again, or resume another one."""
    from bitnet_jax.console import command  # the interpreter that runs (.venv/bin/python after make train)

    config = paths.config if paths.config.is_file() else "configs/<name>.yaml"
    return (f"start it afresh with {command('python', 'train.py', '--config', config, '--run-id', 'NEW_ID')}, "
            "or name an older run to resume (--resume RUN_DIR)")


def _no_checkpoint_yet(run_dir: Path) -> str:
    """Why ``run_dir`` has no step to read, and when it will have one (from its config.yaml)."""
    paths = RunPaths(run_dir)
    if paths.config.is_file():
        try:
            when = save_steps_text(config_lib.load(paths.config))
        except ConfigError:
            when = "as its config.yaml's checkpoint.every says"
        return (f"{run_dir} has no checkpoint yet: its run saves one {when}. If it is still running, wait "
                f"for the first save; else {_start_afresh(paths)}")
    if not paths.checkpoints.is_dir():
        return (f"{run_dir} holds no complete checkpoint and no {CONFIG_FILE}: it is not a run "
                "directory made by train.py (runs/<run_id>)")
    return f"{run_dir} holds no complete checkpoint (looked in {paths.checkpoints}) and no {CONFIG_FILE}"


def resolve_step(run_dir: str | Path, step: int | None, scan: dict[int, SavedStep] | None = None) -> int:
    """``step`` if it is a complete step of ``run_dir``; None: the newest complete one (incomplete newer
    folders are skipped with a warning naming them). ``scan``: a ``scan_steps`` already made."""
    run_dir = Path(run_dir)
    scan = scan_steps(run_dir) if scan is None else scan
    steps = complete_steps(run_dir, warn=step is None, scan=scan)
    damaged = [s for s, saved in scan.items() if saved.problem is not None]
    if not steps:
        if not damaged:
            raise CheckpointError(_no_checkpoint_yet(run_dir))
        raise CheckpointError(f"{checkpoints_dir(run_dir)} holds no complete checkpoint (incomplete or "
                              f"damaged: {damaged}; see the warnings above for why); "
                              f"{_start_afresh(RunPaths(run_dir))}")
    if step is None:
        return steps[-1]
    if step not in steps:
        saved = scan.get(step)
        why = (f"no folder {checkpoints_dir(run_dir) / str(step)}" if saved is None else
               f"{saved.path} is incomplete or damaged: {saved.problem}")
        raise CheckpointError(f"step {step} is not a complete checkpoint of {run_dir} ({why}); available "
                              f"steps: {', '.join(map(str, steps))}")
    return step


def older_complete(scan: dict[int, SavedStep], step: int) -> list[SavedStep]:
    """The complete steps of ``scan`` before ``step``, oldest first."""
    return [saved for s, saved in scan.items() if s < step and saved.problem is None]
