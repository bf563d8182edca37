"""One trainer per run directory: ``RUN_DIR/trainer.lock`` names the process that writes the run.

Two trainers on one run directory overwrite each other's checkpoints and interleave their TensorBoard
files, so a trainer takes the lock before it writes anything there and the second one is refused at
start, in one line that names the holder. The lock file is created atomically (``O_CREAT | O_EXCL``)
and holds ``{"pid", "host", "started", "proc_start"}``; it is removed when the trainer exits. A lock
left by a process that is gone (kill -9, a crash, a reboot) is stale and is taken over: on the same
host, when no process has that pid, or the pid now belongs to a process started at another time
(``proc_start``, Linux's start time of the process, guards against pid reuse). A lock held from
another host cannot be checked from here; the message says how to remove it by hand.

Readers (status.py) never take the lock; ``read_holder`` tells them who writes the run. Standard
library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from bitnet_jax.config import ConfigError

LOCK_FILE = "trainer.lock"


class RunLocked(ConfigError):
    """Another live trainer holds the run directory."""


def _proc_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux); None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in () may hold spaces


def _alive(pid: int, proc_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return proc_start is None or _proc_start(pid) in (None, proc_start)


def read_holder(run_dir: str | Path) -> dict | None:
    """The lock's record, with ``"alive"``: True/False on this host, None for another host (unknown);
    None when no trainer holds the run (or the file is unreadable)."""
    try:
        holder = json.loads((Path(run_dir) / LOCK_FILE).read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    holder["alive"] = _alive(pid, holder.get("proc_start")) if host == socket.gethostname() else None
    return holder


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder['pid']} on {holder['host']} (started {started})"


class RunLock:
    """``acquire()`` takes ``RUN_DIR/trainer.lock`` or raises RunLocked; ``release()`` removes it (only
    if it is still this process's)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self.took_over: dict | None = None  # the stale record this lock replaced, if any

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "proc_start": _proc_start(os.getpid())}
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
        return True

    def acquire(self) -> "RunLock":
        # Takers on this host are serialised (a flock on the run directory itself) while they judge and
        # break a stale lock, so two of them cannot both take it over.
        guard = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if not self._create():
                holder = read_holder(self.path.parent)
                if holder is None or holder["alive"] is not False:
                    raise RunLocked(self._refusal(holder))
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                self.took_over = holder
                if not self._create():
                    raise RunLocked(self._refusal(read_holder(self.path.parent)))
        finally:
            os.close(guard)  # (releases the flock)
        self.held = True
        return self

    def note(self) -> str | None:
        """One line about a stale lock this one replaced (a trainer killed without cleaning up)."""
        return self.took_over and f"{self.path.parent} was locked by {_describe(self.took_over)}, which is gone"

    def _refusal(self, holder: dict | None) -> str:
        if holder is None:
            return (f"{self.path.parent} is locked by another trainer ({self.path} exists but cannot be read); "
                    f"if no trainer runs on it, delete {self.path}")
        where = "" if holder["alive"] else (f"; it may have ended, but its host cannot be checked from here: if no "
                                            f"trainer runs on it, delete {self.path}")
        return (f"{self.path.parent} is being trained by {_describe(holder)}; two trainers on one run would "
                f"overwrite each other's checkpoints. Wait for it to end, stop it, or choose another "
                f"--run-id{where}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if int(json.loads(self.path.read_text())["pid"]) == os.getpid():
                self.path.unlink()
