"""A new run's folder: made before its start writes anything, and removed again when that start
fails before the run trained (so a bad data file leaves no half-made run behind). Files only.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from bitnet_jax import config as config_lib
from bitnet_jax.config import Config, ConfigError
from bitnet_jax.run_dir import RunPaths, checkpoints_dir, complete_steps


def make_run_folder(root: str | Path) -> Path:
    """Creates (if needed) the folder of a new run; returns it absolute. A folder that cannot be made
    (a read-only file system, --runs-dir naming a file) is a ConfigError in one line."""
    root = Path(root).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {root}: {e.strerror or e}; choose a writable "
                          "--runs-dir") from None
    return root


def prepare_run_dir(root: str | Path, cfg: Config) -> RunPaths:
    """Makes the folder of a NEW run and writes its ``config.yaml``; refuses, before writing anything,
    a folder that already holds checkpoints."""
    paths = RunPaths(Path(root).resolve())
    if complete_steps(paths.root):
        raise ConfigError(
            f"{paths.root} already holds checkpoints; pass --resume {paths.root} to continue it "
            f"(or --resume latest --run-id {paths.root.name}), or choose another --run-id")
    make_run_folder(paths.root)
    paths.config.write_text(config_lib.dump(cfg))
    return paths


@dataclasses.dataclass(frozen=True)
class NewRunFolder:
    """A new run's folder as it was before its start wrote anything (``before_start``): ``before``
    names its entries then; None: the folder did not exist, the start creates it (and ``made``, the
    outermost of its parents that did not exist either, e.g. ``runs/``)."""

    root: Path
    before: frozenset[str] | None
    made: Path | None = None

    @classmethod
    def before_start(cls, root: str | Path) -> NewRunFolder:
        root = Path(root).resolve()
        if root.is_dir():
            return cls(root, frozenset(p.name for p in root.iterdir()))
        made = root
        while not made.parent.exists():
            made = made.parent
        return cls(root, None, made)


def _logged_a_step(tb: Path) -> bool:
    from bitnet_jax.eventfile import EventLog  # numpy only

    log = EventLog(tb)
    try:
        log.update()
    except OSError:
        return True  # cannot tell: keep it
    return any(tag.startswith("train/") for tag in log.tags())


def discard_failed_start(folder: NewRunFolder) -> str | None:
    """After a new run failed: when it saved nothing (its checkpoints/ holds no step, finished or not)
    and logged no training step, removes what its start wrote (the folder, when the start made it;
    else only the entries it added) and returns the line that says so. Anything else (a checkpoint, a
    save begun, a logged step: what a run that trained leaves) is kept, and None returned."""
    root = folder.root
    ckpts = checkpoints_dir(root)
    if not root.is_dir() or (ckpts.is_dir() and any(ckpts.iterdir())) or _logged_a_step(root / "tb"):
        return None
    made = [root] if folder.before is None else sorted(p for p in root.iterdir() if p.name not in folder.before)
    try:
        for p in made:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if folder.made is not None:  # the parents it made, while empty
            for parent in root.parents:
                if not parent.is_relative_to(folder.made) or any(parent.iterdir()):
                    break
                parent.rmdir()
    except OSError as e:
        return f"could not remove what the failed start wrote in {root}: {e}"
    what = root if folder.before is None else f"{', '.join(p.name for p in made)} from {root}"
    return f"removed {what}: the start failed before its first step and saved nothing"
