"""``RUN_DIR/end.json``: how the trainer's last process ended, for status.py.

Without it a run that halted (exit 3) or failed looks like a live one until it goes stale. The
trainer (process 0) writes it once at exit, after closing the event writer::

    {"state": "finished" | "halted" | "stopped" | "failed", "step": 412 | null,
     "reason": "non-finite loss (train.on_nan: halt)", "exit_code": 3, "time": 1732700000.5}

``step`` is the last completed optimizer step (null when none ran), ``time`` the Unix time of
writing. A later start or resume of the same run makes the record stale without deleting it: its
first event is newer than ``time``, and readers ignore a record older than the newest event
(``is_current``). Standard library only, so status.py can read it without jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

END_FILE = "end.json"
STATES = ("finished", "halted", "stopped", "failed")


class EndRecordError(ValueError):
    """end.json exists but is not a record this module wrote."""


@dataclasses.dataclass(frozen=True)
class EndRecord:
    state: str
    step: int | None
    reason: str
    exit_code: int
    time: float

    def is_current(self, newest_event_time: float | None) -> bool:
        """False when something was logged after the record was written (a later start)."""
        return newest_event_time is None or self.time >= newest_event_time


def write_end_record(run_dir: str | Path, state: str, step: int | None, reason: str, exit_code: int,
                     now: float | None = None) -> Path:
    """Writes ``run_dir/end.json`` atomically (a temporary file, fsynced, then renamed over it), so a
    reader sees the old record or the new one, never half of one. Returns the path."""
    if state not in STATES:
        raise ValueError(f"end state must be one of {', '.join(STATES)}, got {state!r}")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ValueError(f"end step must be a non-negative int or None, got {step!r}")
    record = {"state": state, "step": step, "reason": str(reason), "exit_code": int(exit_code),
              "time": time.time() if now is None else float(now)}
    path = Path(run_dir) / END_FILE
    tmp = path.with_name(f".{END_FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: leave no empty temporary file behind
        raise
    try:  # the rename itself survives a power cut only once the directory is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # e.g. a file system that cannot fsync directories; the record is still in place
    return path


def read_end_record(run_dir: str | Path) -> EndRecord | None:
    """The record, or None when the run has none; EndRecordError when end.json is unreadable."""
    path = Path(run_dir) / END_FILE
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise EndRecordError(f"{END_FILE} could not be read ({e.__class__.__name__})") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise EndRecordError(f"{END_FILE} is not JSON") from None
    if not isinstance(data, dict):
        raise EndRecordError(f"{END_FILE} is not a JSON object")
    state, step, when, code = data.get("state"), data.get("step"), data.get("time"), data.get("exit_code")
    if state not in STATES:
        raise EndRecordError(f"{END_FILE}: unknown state {state!r} (expected one of {', '.join(STATES)})")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise EndRecordError(f"{END_FILE}: step is not an integer")
    if not isinstance(when, (int, float)) or isinstance(when, bool) or not math.isfinite(when):
        raise EndRecordError(f"{END_FILE}: time is not a number")
    if not isinstance(code, int) or isinstance(code, bool):
        raise EndRecordError(f"{END_FILE}: exit_code is not an integer")
    return EndRecord(state, step, str(data.get("reason") or ""), code, float(when))
