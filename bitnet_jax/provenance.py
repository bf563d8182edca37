"""provenance.json: what produced a run (code, command, software, hardware, config), one record per start.

The file is ``{"records": [...]}``: a fresh run writes one record, every resume appends another, so
a run continued on other machines or code keeps the history of each leg.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bitnet_jax.config import ConfigError

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets",
            "tensorboardX", "tokenizers", "numpy")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode("utf-8", "replace") if out.returncode == 0 else None


def git_info() -> dict[str, Any]:
    """Commit of the code that runs, whether tracked files differ from it (and a sha256 of that
    diff, to tell two dirty runs apart), and how many untracked files there are. All None outside
    a git checkout (an installed wheel)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None, "untracked_files": None}
    diff = _git("diff", "HEAD", "--binary") or ""
    untracked = _git("ls-files", "--others", "--exclude-standard") or ""
    return {
        "commit": commit.strip(),
        "dirty": bool(diff),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "untracked_files": len(untracked.split()),
    }


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def devices_info() -> dict[str, Any]:
    import jax

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "device_kinds": sorted({d.device_kind for d in devices}),
    }


def config_sha256(config_yaml: str) -> str:
    """Hash of the resolved config as written to config.yaml (same text, same hash)."""
    return hashlib.sha256(config_yaml.encode()).hexdigest()


def make_record(config_yaml: str, *, resumed_from_step: int | None = None,
                argv: list[str] | None = None) -> dict[str, Any]:
    return {
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from_step": resumed_from_step,
        "command": [sys.executable, *(sys.argv if argv is None else argv)],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_info(),
        "devices": devices_info(),
        "config_sha256": config_sha256(config_yaml),
    }


def append_record(path: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Adds ``record`` to ``path`` (creating it); returns all records. A file that is not ours is
    an error rather than silently replaced: it is the run's history."""
    records: list[dict[str, Any]] = []
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            records = list(data["records"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} exists but is not a provenance file ({{'records': [...]}}); move it "
                             "away or pick another --run-id") from None
    records.append(record)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"records": records}, indent=2) + "\n")
    tmp.replace(path)  # a crash mid-write never leaves half a history
    return records


def write_provenance(run_dir: Path, config_yaml: str, resumed_from_step: int | None = None) -> dict[str, Any]:
    """Appends this start's record to ``run_dir/provenance.json``; returns the record."""
    record = make_record(config_yaml, resumed_from_step=resumed_from_step)
    append_record(Path(run_dir) / "provenance.json", record)
    return record
