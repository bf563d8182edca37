"""A run directory as status reads it: its files only, never the trainer; read incrementally."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bitnet_jax.console import command  # the interpreter that runs (numpy, no jax)
from bitnet_jax.run_dir import complete_steps  # files only: status never imports jax or Orbax
from bitnet_jax.run_lock import read_holder  # read only: status never takes the lock
from bitnet_jax.end_record import EndRecord, EndRecordError, read_end_record
from bitnet_jax.eventfile import EventLog, is_event_file
from bitnet_jax.config import LenientConfig
from bitnet_jax.status.run_config import load_config

RUN_FILES = ("config.yaml", "tb", "provenance.json", "dataset_fingerprint.json", "checkpoints", "samples.jsonl")


class RunDirError(Exception):
    """RUN_DIR is missing or is not a run directory (the CLI exits 2 with this message)."""


def _looks_like_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def check_run_dir(path: Path) -> None:
    """Raises RunDirError with what to do when ``path`` is not a readable run directory."""
    if not path.exists():
        raise RunDirError(f"run directory {path} does not exist (expected runs/<run_id>/ as written by train.py)")
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory; pass a run directory such as runs/<run_id>/")
    try:
        entries = list(path.iterdir())
    except PermissionError as e:
        raise RunDirError(f"cannot read {path}: {e}") from None
    if not entries:
        raise RunDirError(
            f"run directory {path} is empty: no config.yaml and no tb/ event files yet "
            "(a run writes them within seconds of starting; check that train.py is running and writing here: "
            "--runs-dir/--run-id)"
        )
    if _looks_like_run(path) or any(is_event_file(p) for p in entries):
        return
    runs = sorted((p for p in entries if p.is_dir() and _looks_like_run(p)), key=lambda p: p.stat().st_mtime)
    if runs:
        raise RunDirError(
            f"{path} holds {len(runs)} run(s), not a single run; pass one of them, e.g. "
            f"{command('python', 'status.py', runs[-1])}"
        )
    raise RunDirError(f"{path} is not a run directory: it has none of {', '.join(RUN_FILES)} "
                      "(expected runs/<run_id>/ as written by train.py)")


class Run:
    """A run directory, read incrementally: each ``refresh()`` reads only what was appended."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        check_run_dir(self.path)
        self.run_id = self.path.resolve().name
        tb = self.path / "tb"
        self.log = EventLog(tb if tb.is_dir() or not any(map(is_event_file, self.path.iterdir())) else self.path)
        self.config: LenientConfig | None = None
        self.config_notes: list[str] = []
        self._config_stamp: tuple[int, int] | None = None  # config.yaml's (mtime_ns, size) when read

    def refresh(self) -> int:
        """Reads new event bytes (and config.yaml when it appears or changes); returns the new
        record count."""
        if not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} disappeared")
        path = self.path / "config.yaml"
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if self.config is None or stamp != self._config_stamp:
            self.config, self.config_notes = load_config(path)
            self._config_stamp = stamp
        return self.log.update()

    # ----------------------------------------------------------------- files besides the events

    def checkpoints(self) -> tuple[list[int], list[int]]:
        """(complete checkpoint steps, steps being saved now), both sorted. Complete means what
        ``--resume latest`` would accept (``run_dir.complete_steps``): a step folder from an
        unfinished or damaged save is not listed."""
        folder = self.path / "checkpoints"
        done = complete_steps(self.path)
        saving = []
        if folder.is_dir():
            for p in folder.iterdir():
                if "orbax-checkpoint-tmp" in p.name and p.is_dir():
                    m = re.match(r"(\d+)", p.name)
                    if m:
                        saving.append(int(m.group(1)))
        return done, sorted(set(saving) - set(done))

    def end_record(self) -> tuple[EndRecord | None, str | None]:
        """(end.json's record, None), or (None, why it was not read); (None, None) when there is none."""
        try:
            return read_end_record(self.path), None
        except EndRecordError as e:
            return None, f"{e}: ignored"

    def trainer(self) -> dict | None:
        """Who holds the run's lock (``run_lock.read_holder``: pid, host, and ``alive`` when it can be
        told from this host); None when no trainer holds it."""
        return read_holder(self.path)

    def newest_file_time(self) -> float | None:
        """The newest modification time among the files a starting run writes before its first step."""
        stamps = []
        for p in (self.path, self.path / "config.yaml", self.path / "provenance.json",
                  self.path / "dataset_fingerprint.json", self.path / "tb"):
            try:
                stamps.append(p.stat().st_mtime)
            except OSError:
                pass
        return max(stamps) if stamps else None

    def anomaly_dumps(self) -> list[tuple[int, str]]:
        """(step, event) of each anomalies/<step>_<event>/ folder, by step."""
        folder = self.path / "anomalies"
        out = []
        if folder.is_dir():
            for p in folder.iterdir():
                m = re.match(r"(\d+)_(.+)$", p.name)
                if m and p.is_dir():
                    out.append((int(m.group(1)), m.group(2)))
        return sorted(out)

    def jsonl_samples(self) -> list[dict[str, Any]]:
        """The records of samples.jsonl (lines that are not complete JSON objects are skipped)."""
        path = self.path / "samples.jsonl"
        out = []
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # the writer may be mid-line
                    if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                        out.append(rec)
        return out
