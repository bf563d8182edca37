"""Two processes over ``jax.distributed`` on localhost (CPU, gloo collectives), as on two hosts.

- Library level: two processes with one CPU device each train 10 steps on the same global batches as
  one process with two CPU devices (the same 2-device data-parallel program, only the all-reduce
  crosses a process boundary), save Orbax checkpoints from both processes, restore step 5 and train
  on: the losses equal the single-process run's, and the resumed steps equal the uninterrupted ones
  (synchronous saves here).
- End to end: ``train.py --coordinator/--num-processes/--process-id`` with two processes and the
  default asynchronous saves, then a two-process ``--resume`` from its step-3 checkpoint reproduces
  the uninterrupted losses.

The workers are this file run as a script (a fresh interpreter per process, so each can choose its
own device count before JAX starts).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = {"model": {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 128, "max_position_embeddings": 32},
         "train": {"steps": 10, "batch_size": 8, "seq_len": 32},
         "optim": {"warmup_steps": 2},
         "checkpoint": {"every": 5, "keep_last": 2, "async_save": False}}
STEPS, SAVE_AT = 10, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the library-level worker

def _worker(out_dir: str, run_dir: str, coordinator: str | None, num_processes: int, process_id: int) -> None:
    from bitnet_jax import distributed

    distributed.initialize(distributed.resolve(coordinator, num_processes, process_id))
    import jax

    from bitnet_jax import sharding, train_state
    from bitnet_jax.checkpoint import CheckpointManager
    from bitnet_jax.config import from_dict

    cfg = from_dict(SMALL)
    pi, pc = jax.process_index(), jax.process_count()
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_fits(cfg, mesh)
    graphdef, state = train_state.init_state(cfg)
    state, shardings = train_state.place_state(state, mesh)
    step = train_state.make_train_step(cfg, graphdef, mesh, shardings)

    # The same global batches everywhere; each process feeds only its own rows.
    batches = np.random.default_rng(0).integers(0, 256, (STEPS, 8, 33)).astype(np.int32)
    rows = 8 // pc
    local = batches[:, pi * rows:(pi + 1) * rows]

    mngr = CheckpointManager(Path(run_dir), cfg)
    losses = []
    for i in range(STEPS):
        state, m = step(state, sharding.global_batch(local[i], mesh))
        losses.append(m["loss"])
        if i + 1 == SAVE_AT:
            mngr.save(SAVE_AT, state, data_state={"process": pi, "next_batch": SAVE_AT})
    mngr.wait()

    _, abstract = train_state.abstract_state(cfg)
    state, data_states, meta = mngr.restore(SAVE_AT, abstract, sharding.state_shardings(abstract, mesh))
    mngr.close()
    data_state = data_states[pi]  # the checkpoint holds every process's loader state
    resumed = []
    for i in range(data_state["next_batch"], STEPS):
        state, m = step(state, sharding.global_batch(local[i], mesh))
        resumed.append(m["loss"])
    out = {"process_index": pi, "process_count": pc, "device_count": jax.device_count(),
           "losses": [float(x) for x in jax.device_get(losses)],
           "resumed": [float(x) for x in jax.device_get(resumed)],
           "restored_data_state": data_state, "saved_processes": len(data_states), "restored_step": meta["step"]}
    Path(out_dir, f"process_{pi}.json").write_text(json.dumps(out))


def _launch(args: list[str], devices: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    # Output goes to files, not pipes: waiting on one process while the other fills an unread pipe
    # would block it, and the first would then time out at the shutdown barrier.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    proc.log = log
    return proc


def _wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        p.log.seek(0)
        output = p.log.read()
        p.log.close()
        assert p.returncode == 0, output[:3000] + "\n...\n" + output[-3000:]


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
    coordinator = f"localhost:{_free_port()}"
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    _wait_all([_launch([__file__, str(two), str(two / "run"), coordinator, "2", str(i)], devices=1)
               for i in range(2)] +
              [_launch([__file__, str(one), str(one / "run"), "", "1", "0"], devices=2)])
    p0, p1 = (json.loads((two / f"process_{i}.json").read_text()) for i in range(2))
    single = json.loads((one / "process_0.json").read_text())

    assert (p0["process_count"], p0["device_count"], p1["process_index"]) == (2, 2, 1)
    assert (single["process_count"], single["device_count"]) == (1, 2)
    # The same 2-device program: equal to float precision (a two-term all-reduce is order-free).
    np.testing.assert_allclose(p0["losses"], single["losses"], rtol=1e-6)
    assert p0["losses"] == p1["losses"]  # every process sees the same replicated loss
    # Resumed from the checkpoint both processes wrote: bit for bit the uninterrupted steps.
    assert p0["resumed"] == p0["losses"][SAVE_AT:]
    assert single["resumed"] == single["losses"][SAVE_AT:]
    # Each process gets back its own data-loader state.
    assert p0["restored_data_state"] == {"process": 0, "next_batch": SAVE_AT}
    assert p1["restored_data_state"] == {"process": 1, "next_batch": SAVE_AT}
    assert p0["restored_step"] == SAVE_AT and p0["saved_processes"] == 2


# --------------------------------------------------------------------------- train.py end to end

TRAIN_SETS = ["train.steps=6", "model.hidden_size=64", "model.num_attention_heads=4", "train.batch_size=4",
              "train.seq_len=32", "eval.every=0", "checkpoint.every=3", "optim.warmup_steps=2",
              "log.metrics_every=0", "log.samples_every=0", "log.progress=false"]


def _train_cli(extra: list[str], port: int) -> list[subprocess.Popen]:
    sets = [a for s in TRAIN_SETS for a in ("--set", s)]
    return [_launch(["train.py", *extra, *sets, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                     "--process-id", str(i)], devices=1) for i in range(2)]


def _tb_losses(run_dir: Path) -> dict[int, float]:
    from bitnet_jax.eventfile import EventLog

    log = EventLog(run_dir / "tb")
    log.update()
    series = log.scalars("train/loss")
    return {int(s): float(v) for s, v in zip(series.steps, series.values)}


@pytest.mark.slow
def test_train_cli_two_processes_resume_matches_uninterrupted(tmp_path):
    runs = tmp_path / "runs"
    _wait_all(_train_cli(["--config", str(REPO / "configs/tiny.yaml"), "--runs-dir", str(runs),
                          "--run-id", "full"], _free_port()))
    full = runs / "full"
    assert {"3", "6"} <= {p.name for p in (full / "checkpoints").iterdir()}
    _wait_all(_train_cli(["--resume", str(full / "checkpoints" / "3"), "--runs-dir", str(runs),
                          "--run-id", "resumed"], _free_port()))
    a, b = _tb_losses(full), _tb_losses(runs / "resumed")
    assert sorted(a) == [1, 2, 3, 4, 5, 6]
    assert {s: b[s] for s in (4, 5, 6)} == {s: a[s] for s in (4, 5, 6)}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    out_dir, run_dir, coordinator, n, pid = sys.argv[1:6]
    _worker(out_dir, run_dir, coordinator or None, int(n), int(pid))
