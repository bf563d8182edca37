"""End to end: train.py stopped (--stop-at, SIGTERM, kill -9) and resumed continues bit for bit.

Every run is a real subprocess of train.py on a tiny model. The reference is one uninterrupted
100-step run; the others must match its loss at every resumed step and its final parameters exactly.
Kills are triggered by watching the run directory (Orbax's tmp folder of a save appearing, or a
finished step folder appearing), never by sleeping.

Two processes (jax.distributed on localhost) resuming a run with a damaged step agree on the step to
restore, and only process 0 moves directories aside.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bitnet_jax.checkpoint import load_params
from bitnet_jax.run_dir import complete_steps
from conftest import tiny_train_args

REPO = Path(__file__).resolve().parents[1]
STEPS = 100
TINY = tiny_train_args(STEPS, checkpoint_every=10)

pytestmark = pytest.mark.slow


def train_cmd(*args) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *args]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1"}


def run(*args) -> subprocess.CompletedProcess:
    out = subprocess.run(train_cmd(*args), env=env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step from every event file of the run (a repeated step: the newest file wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


def final_params(run_dir: Path):
    cfg, params, step = load_params(run_dir)
    assert step == STEPS
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def assert_same_params(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # bit for bit: exact equality, no tolerance


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = tmp_path_factory.mktemp("ref")
    run(*TINY, "--runs-dir", str(runs), "--run-id", "ref")
    return losses(runs / "ref"), final_params(runs / "ref")


def test_stop_at_50_then_resume_matches_the_uninterrupted_run(tmp_path, reference):
    ref_losses, ref_params = reference
    first = run(*TINY, "--runs-dir", str(tmp_path), "--run-id", "r", "--stop-at", "50")
    run_dir = tmp_path / "r"
    assert "stopped by --stop-at at step 50" in first.stdout
    assert f"python train.py --resume {run_dir}" in first.stdout
    assert max(complete_steps(run_dir)) == 50
    assert max(losses(run_dir)) == 50

    second = run("--resume", "latest", "--runs-dir", str(tmp_path), "--run-id", "r", "--no-eval")
    assert f"resuming from {run_dir / 'checkpoints' / '50'}" in second.stderr
    got = losses(run_dir)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert {s: got[s] for s in range(51, STEPS + 1)} == {s: ref_losses[s] for s in range(51, STEPS + 1)}
    assert_same_params(final_params(run_dir), ref_params)


def start(log: Path, *args) -> subprocess.Popen:
    """train.py in the background, its output (stdout and stderr) going to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(train_cmd(*args), env=env(), stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def wait_for(proc: subprocess.Popen, log: Path, condition, what: str):
    """Polls ``condition()`` until it returns something truthy; fails if the run ends first."""
    while True:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"train.py ended (code {proc.returncode}) before {what}: {log.read_text()[-2000:]}")
        time.sleep(0.002)


def saving_tmp_dir(ckpt_dir: Path, min_step: int):
    """The step of an Orbax tmp folder (a save in progress) at or after ``min_step``, if any."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", p.name)
            if m and int(m.group(1)) >= min_step:
                return int(m.group(1))
    return None


def test_sigterm_saves_exits_0_and_resume_continues_exactly(tmp_path, reference):
    ref_losses, ref_params = reference
    run_dir = tmp_path / "r"
    log = tmp_path / "log"
    proc = start(log, *TINY, "--runs-dir", str(tmp_path), "--run-id", "r")
    wait_for(proc, log, lambda: (run_dir / "checkpoints" / "20").is_dir(), "step 20 was saved")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    m = re.search(r"stopped by SIGTERM at step (\d+) of 100: saved checkpoints/\1 in ([\d.]+) s", out)
    assert m, out[-2000:]
    stopped = int(m.group(1))
    assert 20 <= stopped < STEPS and max(complete_steps(run_dir)) == stopped
    assert f"python train.py --resume {run_dir}" in out

    run("--resume", str(run_dir), "--no-eval")
    got = losses(run_dir)
    assert {s: got[s] for s in range(stopped + 1, STEPS + 1)} == {
        s: ref_losses[s] for s in range(stopped + 1, STEPS + 1)}
    assert_same_params(final_params(run_dir), ref_params)


def test_kill_9_at_random_moments_then_resume_latest_finishes_exactly(tmp_path, reference):
    """Three SIGKILLs of one run, each at a seeded random save step: during the asynchronous write
    (Orbax's tmp folder exists) or right after a save completed. Each restart resumes from the newest
    complete step, losing no completed checkpoint; the last one finishes the run."""
    _, ref_params = reference
    rng = random.Random(1234)
    run_dir = tmp_path / "r"
    ckpt_dir = run_dir / "checkpoints"
    first = True
    save_steps = [10, 20, 30, 40, 49, 50, 60, 70, 80]
    last_complete = 0
    modes = ["during_save"] + [rng.choice(["during_save", "after_save"]) for _ in range(2)]
    for trial, mode in enumerate(modes):
        # the first kill comes after step 10 is complete, so there is always something to resume
        candidates = [s for s in save_steps if s > max(last_complete, 10)]
        target = rng.choice(candidates[:3])
        args = TINY + ["--runs-dir", str(tmp_path), "--run-id", "r"] if first else [
            "--resume", "latest", "--runs-dir", str(tmp_path), "--run-id", "r", "--no-eval"]
        log = tmp_path / f"log{trial}"
        proc = start(log, *args)
        if mode == "during_save":
            wait_for(proc, log, lambda: saving_tmp_dir(ckpt_dir, target), f"a save at step >= {target} began")
        else:
            wait_for(proc, log, lambda: any(s >= target for s in complete_steps(run_dir)),
                     f"step {target} was saved")
        complete_before = complete_steps(run_dir)
        proc.kill()
        proc.wait(timeout=60)
        out = log.read_text()
        assert proc.returncode == -signal.SIGKILL
        if not first:
            assert f"resuming from {ckpt_dir / str(last_complete)}" in out, out[-2000:]
        complete_after = complete_steps(run_dir)
        # nothing complete was lost; a save cut short never counts as complete
        assert complete_before and max(complete_after) >= max(complete_before)
        assert all(step_dir.name.isdigit() or ".orbax-checkpoint-tmp" in step_dir.name
                   for step_dir in ckpt_dir.iterdir())
        last_complete = max(complete_after)
        first = False

    out = run("--resume", "latest", "--runs-dir", str(tmp_path), "--run-id", "r", "--no-eval")
    assert f"resuming from {ckpt_dir / str(last_complete)}" in out.stderr
    assert not any(".orbax-checkpoint-tmp" in p.name for p in ckpt_dir.iterdir())
    assert_same_params(final_params(run_dir), ref_params)


# --------------------------------------------------------------------------- each step's files read once

COUNTING_RESUME = r'''
import collections, json, os, sys
from pathlib import Path
from bitnet_jax import run_dir as rd
parsed, opened = collections.Counter(), collections.Counter()
original = rd._parse_json
def counting(path):
    parsed[str(Path(path).resolve())] += 1
    return original(path)
rd._parse_json = counting
def audit(event, args):  # every open by Python code, Orbax's included
    if event == "open" and isinstance(args[0], (str, os.PathLike)) and isinstance(args[1], str):
        path = Path(os.fsdecode(args[0]))
        if (path.parent.name, path.name) == ("meta", "metadata") and not set("wax+") & set(args[1]):
            opened[str(path.resolve())] += 1
sys.addaudithook(audit)
from bitnet_jax.train_cli import main
code = main(sys.argv[1:])
print("COUNTS " + json.dumps({"code": code, "parsed": parsed, "opened": opened}), flush=True)
'''


def test_a_resume_reads_each_steps_metadata_once(tmp_path):
    """A real resume (``--resume r``, relative to the working directory) of a run with two steps
    on disk: every small JSON file of each step is parsed once, and ``meta/metadata`` is opened
    once in all, by this project or Orbax."""
    run(*TINY, "--runs-dir", str(tmp_path), "--run-id", "r", "--stop-at", "20")
    run_dir = tmp_path / "r"
    assert complete_steps(run_dir) == [10, 20]
    small_files = {str(run_dir / "checkpoints" / str(step) / name): step for step in (10, 20)
                   for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata", "meta/metadata")}
    out = subprocess.run([sys.executable, "-c", COUNTING_RESUME, "--resume", "r", "--stop-at", "21", "--no-eval"],
                         env=env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    counts = json.loads(re.search(r"^COUNTS (.*)$", out.stdout, re.M).group(1))
    assert counts["code"] == 0 and complete_steps(run_dir) == [10, 20, 21]
    assert f"resuming from {run_dir.resolve() / 'checkpoints' / '20'}" in out.stderr
    assert {path: counts["parsed"].get(path, 0) for path in small_files} == dict.fromkeys(small_files, 1)
    meta_files = [p for p in small_files if p.endswith("meta/metadata")]
    assert {path: counts["opened"].get(path, 0) for path in meta_files} == dict.fromkeys(meta_files, 1)


# --------------------------------------------------------------------------- two processes, one damaged step

TWO_PROCESS_WORKER = r'''
import json, shutil, sys, warnings
from pathlib import Path
run_dir, port, pid, scenario = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
from bitnet_jax import distributed
distributed.initialize(distributed.resolve(f"localhost:{port}", 2, pid))
from jax.experimental import multihost_utils
from bitnet_jax import checkpoint as ck, config as config_lib, resume as R, sharding, train_state
from bitnet_jax.run_dir import COMMIT_FILE
cfg = config_lib.from_dict({
    "model": {"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "intermediate_size": 128, "max_position_embeddings": 32},
    "train": {"steps": 10, "batch_size": 8, "seq_len": 32}, "optim": {"warmup_steps": 2},
    "tokenizer": {"builtin_vocab_size": 300}, "checkpoint": {"every": 3, "keep_last": 2, "async_save": False}})
mesh = sharding.make_mesh(cfg.mesh)
_, state = train_state.init_state(cfg)
state, shardings = train_state.place_state(state, mesh)
mngr = ck.CheckpointManager(run_dir, cfg)
for s in (3, 6):
    mngr.save(s, state, data_state={"process": pid, "step": s})
mngr.close()
multihost_utils.sync_global_devices("saved")
if pid == 0:  # an unfinished save at 9, and step 6 with truncated array files
    shutil.copytree(run_dir / "checkpoints" / "6", run_dir / "checkpoints" / "9")
    (run_dir / "checkpoints" / "9" / COMMIT_FILE).unlink()
    if scenario == "damaged":
        for p in (run_dir / "checkpoints" / "6").glob("state/ocdbt.process_*/d/*"):
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
multihost_utils.sync_global_devices("damaged")
if scenario == "error" and pid == 1:  # out of memory on process 1 only, after Orbax's own collectives
    import orbax.checkpoint as ocp
    original = ocp.CheckpointManager.restore
    def restore(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory on process 1")
    ocp.CheckpointManager.restore = restore
out = {"pid": pid}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        cfg2, plan = R.plan(R.parse_target(str(run_dir), str(run_dir.parent), None), None, [], None)
        _, abstract = train_state.abstract_state(cfg2)
        restored = R.restore(plan.target, plan.step, abstract, sharding.state_shardings(abstract, mesh))
        out.update(step=restored.step, data_state=restored.data_state)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
out["moved_warnings"] = sum("moved damaged" in str(w.message) for w in caught)
print("RESULT " + json.dumps(out), flush=True)
'''


def _two_processes(tmp_path: Path, scenario: str) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(TWO_PROCESS_WORKER)
    envs = {**env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        envs.pop(key, None)
    logs = [open(tmp_path / f"log{i}", "w+") for i in range(2)]  # files: a full pipe would block one
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "run"), str(port), str(i), scenario],
                              env=envs, cwd=REPO, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = []
    for log in logs:
        log.seek(0)
        text = log.read()
        log.close()
        m = re.search(r"^RESULT (.*)$", text, re.M)
        assert m, text[-3000:]
        out.append(json.loads(m.group(1)))
    return out


def test_two_processes_agree_on_a_damaged_step_and_only_process_0_moves(tmp_path):
    p0, p1 = _two_processes(tmp_path, "damaged")
    # both fall back to the same step, each with its own loader state; only process 0 moved anything
    assert (p0["step"], p1["step"]) == (3, 3)
    assert (p0["data_state"], p1["data_state"]) == ({"process": 0, "step": 3}, {"process": 1, "step": 3})
    assert (p0["moved_warnings"], p1["moved_warnings"]) == (2, 0)  # the unfinished 9, the damaged 6
    assert complete_steps(tmp_path / "run") == [3]
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "run" / "damaged_checkpoints").iterdir()) == ["6", "9"]


def test_an_error_on_one_process_stops_both_and_moves_nothing_healthy(tmp_path):
    p0, p1 = _two_processes(tmp_path, "error")
    assert p1["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED")
    assert p0["error"].startswith("CheckpointError: process 1 failed to restore step 6")
    assert complete_steps(tmp_path / "run") == [3, 6]  # only the unfinished 9 was moved aside
