"""Fault injection against the trainer process itself (real train.py and status.py subprocesses):
kill -9 right after a checkpoint commits, a second trainer on a run that one holds, the stale lock a
killed trainer leaves, a second Ctrl-C, and a run directory that cannot be made.

One long run (far more steps than it will take) is killed with -9 the moment its checkpoint 8 is on
disk; its resume takes over the stale lock, refuses a second trainer, lets status.py read, and is
stopped by two Ctrl-Cs.
"""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bitnet_jax.eventfile import EventLog
from bitnet_jax.run_lock import LOCK_FILE

from conftest import REPO_ROOT as REPO
from conftest import tiny_train_args

LONG = tiny_train_args(100_000, checkpoint_every=4)  # far more steps than the test lets it take

pytestmark = pytest.mark.slow


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def run(script: str, *args, expect: int | None = 0, cwd=REPO) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(REPO / script), *args], env=env(), capture_output=True, text=True,
                         timeout=600, cwd=cwd)
    if expect is not None:
        assert out.returncode == expect, out.stdout[-2000:] + out.stderr[-3000:]
    return out


class Trainer:
    """A train.py process whose output (stdout and stderr, each line tagged) is read as it comes."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env(), cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        self.readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self.lines.put((name, line))

    def wait_for_line(self, text: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                name, line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"train.py ended ({self.proc.returncode}): {self.seen}"
                continue
            self.seen.append((name, line))
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout} s: {self.seen}")

    def finish(self) -> tuple[int, str, str]:
        """(exit code, all of stdout, all of stderr)."""
        code = self.proc.wait(timeout=300)
        for reader in self.readers:
            reader.join()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, *("".join(line for name, line in self.seen if name == want) for want in ("stdout", "stderr"))


def wait_for(condition, what: str, timeout: float = 300, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc is None or proc.poll() is None, f"train.py ended ({proc.returncode}) before {what}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    log = EventLog(run_dir / "tb")
    log.update()
    series = log.scalars(tag)
    return [] if series is None else [int(s) for s in series.steps]


def test_kill_9_after_a_commit_a_stale_lock_a_second_trainer_and_a_double_ctrl_c(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "r"

    # kill -9 the moment checkpoint 8 is committed: every step it covers is in the event files
    first = Trainer(*LONG, "--runs-dir", str(runs), "--run-id", "r")
    wait_for(lambda: (run_dir / "checkpoints" / "8").is_dir(), "checkpoint 8", proc=first.proc)
    first.proc.kill()
    first.finish()
    assert set(range(1, 9)) <= set(logged_steps(run_dir))
    holder = json.loads((run_dir / LOCK_FILE).read_text())
    assert (holder["pid"], holder["host"]) == (first.proc.pid, socket.gethostname())  # left behind by kill -9
    # status.py tells a trainer that is gone (its lock left behind, no end record) from a quiet one
    killed = json.loads(run("status.py", str(run_dir), "--json").stdout)
    assert (killed["state"], killed["trainer"]) == ("killed", {"pid": first.proc.pid, "host": socket.gethostname(),
                                                               "alive": False})
    assert f"its trainer (process {first.proc.pid} on {socket.gethostname()}) is gone" in run(
        "status.py", str(run_dir)).stdout

    # the resume takes the stale lock over, and says so
    second = Trainer("--resume", str(run_dir), "--set", "checkpoint.every=1000", "--no-eval")
    line = second.wait_for_line("which is gone")
    assert f"locked by process {first.proc.pid} on {socket.gethostname()}" in line and "which is gone" in line
    second.wait_for_line("| loss ")  # its first progress line: it trains, Ctrl-C is handled from here
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == second.proc.pid

    # a second trainer on the same run is refused at start, in one line naming the holder
    refused = run("train.py", "--resume", "latest", "--runs-dir", str(runs), "--run-id", "r", "--no-eval",
                  expect=2)
    (message,) = refused.stderr.splitlines()
    assert message.startswith(f"error: {run_dir} is being trained by process {second.proc.pid} on "
                              f"{socket.gethostname()}")
    assert "Traceback" not in refused.stdout + refused.stderr
    # status.py reads the live run without taking (or touching) the lock
    lock_before = (run_dir / LOCK_FILE).read_bytes()
    live = json.loads(run("status.py", str(run_dir), "--json").stdout)
    assert (live["state"], live["trainer"]["pid"], live["trainer"]["alive"]) == ("running", second.proc.pid, True)
    assert (run_dir / LOCK_FILE).read_bytes() == lock_before

    # Ctrl-C: the run says it will save and stop; a second Ctrl-C stops it at once, in one line
    code, stdout, stderr = interrupt_twice(second, run_dir)
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    newest = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert last.startswith("interrupted (a second Ctrl-C): stopped without saving the current step; the newest "
                           f"checkpoint is step {newest}: resume with ")
    assert not (run_dir / LOCK_FILE).exists()  # released on the way out
    end = json.loads((run_dir / "end.json").read_text())
    assert (end["state"], end["exit_code"]) == ("stopped", 130)


def interrupt_twice(trainer: Trainer, run_dir: Path, tries: int = 3) -> tuple[int, str, str]:
    """Ctrl-C once (the run says it will save and stop), then again as soon as it has said so. On a
    loaded machine the stop can win the race (its step saved and the run ended before the second
    Ctrl-C is delivered: a clean stop, exit 0); the run is then resumed and interrupted again."""
    for _ in range(tries):
        trainer.proc.send_signal(signal.SIGINT)
        trainer.wait_for_line("SIGINT: stopping after this step and saving it (Ctrl-C again")
        trainer.proc.send_signal(signal.SIGINT)
        code, stdout, stderr = trainer.finish()
        if code != 0 and "after the run ended" not in stderr:
            return code, stdout, stderr
        assert "stopped by SIGINT" in stdout, stdout[-2000:] + stderr[-2000:]  # the stop won: step saved
        trainer = Trainer("--resume", str(run_dir), "--no-eval")
        trainer.wait_for_line("| loss ")
    raise AssertionError(f"the stop finished before the second Ctrl-C {tries} times")


@pytest.mark.parametrize("runs_dir", ["a_file", "under_a_file"])
def test_a_run_directory_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, runs_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    target = blocker if runs_dir == "a_file" else blocker / "runs"
    out = run("train.py", *LONG, "--runs-dir", str(target), "--run-id", "r", expect=2)
    (line,) = [line for line in out.stderr.splitlines() if not line.startswith("note: ")]
    assert line.startswith(f"error: cannot create the run directory {target / 'r'}: ")
    assert line.endswith("; choose a writable --runs-dir")
    assert "Traceback" not in out.stdout + out.stderr
    assert blocker.read_text() == "not a folder\n"
