"""The run-directory lock (bitnet_jax/run_lock.py): one trainer per run, stale locks taken over.

Real processes stand in for holders: this test's own (alive), and a child that has exited (gone).
The end-to-end refusal of a second train.py is in test_faults_run.py.
"""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from bitnet_jax.run_lock import LOCK_FILE, RunLock, RunLocked, read_holder


def gone_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(run_dir, **fields):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": 0.0, "proc_start": None, **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(record))


def test_the_lock_names_this_process_and_is_removed_on_release(tmp_path):
    lock = RunLock(tmp_path).acquire()
    holder = read_holder(tmp_path)
    assert (holder["pid"], holder["host"], holder["alive"]) == (os.getpid(), socket.gethostname(), True)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists() and read_holder(tmp_path) is None
    assert sorted(os.listdir(tmp_path)) == []  # nothing else left behind


def test_a_second_taker_is_refused_in_one_line_naming_the_holder(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunLocked) as refused:
        RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert f"process {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
    assert read_holder(tmp_path)["pid"] == os.getpid()  # the refusal changed nothing
    lock.release()


def test_a_lock_whose_process_is_gone_is_taken_over_and_said(tmp_path):
    dead = gone_pid()
    write_lock(tmp_path, pid=dead)
    assert read_holder(tmp_path)["alive"] is False
    lock = RunLock(tmp_path).acquire()
    assert read_holder(tmp_path)["pid"] == os.getpid()
    assert f"process {dead} on {socket.gethostname()}" in lock.note()
    lock.release()


def test_a_reused_pid_is_recognised_by_its_start_time(tmp_path):
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc: process start times are not known here")
    write_lock(tmp_path, proc_start=1)  # our pid, but a process that started at another time
    assert read_holder(tmp_path)["alive"] is False
    RunLock(tmp_path).acquire().release()


def test_a_lock_held_from_another_host_is_never_broken(tmp_path):
    write_lock(tmp_path, pid=gone_pid(), host="some-other-host")
    assert read_holder(tmp_path)["alive"] is None  # cannot be checked from here
    with pytest.raises(RunLocked, match=f"delete {tmp_path / LOCK_FILE}"):
        RunLock(tmp_path).acquire()
    assert read_holder(tmp_path)["host"] == "some-other-host"


def test_release_leaves_a_lock_that_another_process_took(tmp_path):
    lock = RunLock(tmp_path).acquire()
    write_lock(tmp_path, pid=1)  # (as if the file had been replaced by another trainer)
    lock.release()
    assert read_holder(tmp_path)["pid"] == 1


def test_of_many_takers_at_once_exactly_one_wins_a_stale_lock(tmp_path):
    write_lock(tmp_path, pid=gone_pid())
    outcomes, start = [], threading.Barrier(8)

    def take():
        start.wait()
        try:
            outcomes.append(RunLock(tmp_path).acquire())
        except RunLocked:
            outcomes.append(None)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(o is not None for o in outcomes) == 1
