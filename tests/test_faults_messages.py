"""Faults whose message or limit was wrong, against real train.py runs (tiny model, few steps):
a run that skips update after update halts at train.max_skipped*, the summary always counts skipped
updates, a halt names the first non-finite step, --resume of a run with nothing saved says what to
do next, and a held-out set that takes every document names the key that sized it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

# peak_lr_1=1e30: step 2's update (lr 5e29 after a 2-step warm-up) blows the weights up, so every
# update from step 3 on is non-finite and skipped.
TINY = ["optim.warmup_steps=2", "model.hidden_size=64", "model.intermediate_size=128", "train.batch_size=4",
        "train.seq_len=32", "eval.every=0", "log.metrics_every=0", "log.samples_every=0", "checkpoint.every=0"]
DIVERGING = ["optim.peak_lr_1=1e30"]


def train(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def start(runs, run_id, *overrides):
    return train("--config", "configs/tiny.yaml", "--runs-dir", str(runs), "--run-id", run_id,
                 *[a for item in TINY + list(overrides) for a in ("--set", item)])


def nonfinite_steps(run_dir):
    return sorted(int(p.name.split("_")[0]) for p in (run_dir / "anomalies").glob("*_nonfinite"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A diverging run that skips (limit 3 in a row), the same run with on_nan halt, a clean run."""
    runs = tmp_path_factory.mktemp("runs")
    out = {
        # train.steps 40: the stage switch (20) and its mandatory saves lie past the halt, so nothing is saved
        "skip": start(runs, "skip", "train.steps=40", "train.max_skipped_consecutive=3", *DIVERGING),
        "halt": start(runs, "halt", "train.steps=10", "train.on_nan=halt", *DIVERGING),
        "clean": start(runs, "clean", "train.steps=6"),
    }
    return runs, out


def test_a_skipping_run_halts_past_max_skipped_consecutive(runs):
    root, out = runs
    proc, run_dir = out["skip"], root / "skip"
    assert proc.returncode == 3, proc.stderr[-3000:]
    skipped = nonfinite_steps(run_dir)  # one dump per skipped update (log.anomaly_dumps_max 50 not reached)
    first = skipped[0]
    # 3 in a row are tolerated; the 4th halts the run (the step dispatched meanwhile is skipped too)
    assert skipped == list(range(first, first + len(skipped))) and len(skipped) in (4, 5), skipped
    assert f"skipped updates: {len(skipped)} (non-finite" in proc.stdout
    end = json.loads((run_dir / "end.json").read_text())
    assert end["state"] == "halted" and end["exit_code"] == 3
    assert end["reason"] == (f"train.max_skipped_consecutive=3 exceeded: 4 updates skipped in all, 4 in a row up "
                             f"to step {first + 3}"), end
    assert f"halted: {end['reason']}" in proc.stdout
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    status = subprocess.run([sys.executable, "status.py", str(run_dir)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert f"halted at step {end['step']} (train.max_skipped_consecutive=3 exceeded" in status.stdout, status.stdout


def test_a_halt_names_the_first_nonfinite_step(runs):
    root, out = runs
    proc, run_dir = out["halt"], root / "halt"
    assert proc.returncode == 3, proc.stderr[-3000:]
    steps = nonfinite_steps(run_dir)
    assert len(steps) >= 2, steps  # a later non-finite step was seen before the stop: it must not be named
    end = json.loads((run_dir / "end.json").read_text())
    assert end["reason"].startswith(f"step {steps[0]}: ") and end["reason"].count("(train.on_nan=halt)") == 1, end
    assert f"halted: step {steps[0]}: " in proc.stdout


def test_the_summary_always_counts_skipped_updates(runs):
    _, out = runs
    assert out["clean"].returncode == 0, out["clean"].stderr[-3000:]
    assert "skipped updates: 0\n" in out["clean"].stdout


def test_resume_of_a_run_with_no_checkpoint_says_what_to_do_next(runs, monkeypatch):
    from bitnet_jax.console import command

    root, _ = runs
    proc = train("--resume", "latest", "--runs-dir", str(root), "--run-id", "halt")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {root / 'halt'} has no checkpoint yet: ")
    monkeypatch.chdir(REPO_ROOT)  # train.py's working directory: .venv/bin/python there after make train
    afresh = command("python", "train.py", "--config", root / "halt" / "config.yaml", "--run-id", "NEW_ID")
    assert line.endswith(f"start it afresh with {afresh}, or name an older run to resume (--resume RUN_DIR)")


def test_a_heldout_set_taking_every_document_names_eval_batches_when_eval_documents_is_null(tmp_path):
    text = tmp_path / "one.txt"  # one paragraph (one document) of well over the 4 x 32 + 1 tokens eval.batches=1 needs
    text.write_text(" ".join(f"word{j}" for j in range(200)) + "\n")
    proc = start(tmp_path / "runs", "heldout", "train.steps=6", "data.source=local", f"data.data_files={text}",
                 "eval.every=1", "eval.batches=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: the held-out set takes every document of the dataset (1), leaving nothing to "
                           "train on; lower eval.batches (data.eval_documents is null"), line
    assert "lower data.eval_documents" not in line
    assert not (tmp_path / "runs" / "heldout").exists()  # refused before the run folder is made
