"""End-to-end runs of train.py in a subprocess: dry run, a short real run read back from TensorBoard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bitnet_jax.console import command

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--set", "train.steps=24", "--set", "optim.warmup_steps=4", "--set", "eval.every=12",
         "--set", "train.batch_size=8", "--set", "train.seq_len=64", "--set", "log.progress=false"]


def run_train(*args, cwd=REPO, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_of_the_95m_config():
    out = run_train("--config", "configs/bitnet_95m.yaml", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "parameters:        95,401,728" in out.stdout
    assert "1,966,080,000 (1.97B)" in out.stdout
    assert "685.7 MFLOP" in out.stdout


def test_train_steps_alone_gives_a_short_run_of_the_95m_config_and_says_what_it_derived():
    out = run_train("--config", "configs/bitnet_95m.yaml", "--set", "train.steps=3", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert ("note: train.steps=3: optim.warmup_steps 375 -> 1, optim.stage_switch 30000 -> 2 (same share of the run)"
            in out.stderr)
    assert "over 3 steps" in out.stdout and "stage switch:      step 2" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--set", "train.stepz=3"], "unknown config key train.stepz"),
    (["--set", "model.hidden_size=130"], "divisible by model.num_attention_heads"),
    (["--set", "train.seq_len=1024"], "above model.max_position_embeddings"),
    # Inputs read before the run folder is made: a failed start leaves nothing behind.
    (["--set", "data.source=local", "--set", "data.data_files=/nonexistent/x.txt"],
     "data.data_files: '/nonexistent/x.txt' does not exist"),
    (["--set", "tokenizer.name_or_path=/nonexistent/tok.json"], "tokenizer.name_or_path '/nonexistent/tok.json' does not exist"),
    (["--set", "log.prompts=[" + "word " * 300 + "]"], "log.prompts[0]"),
])
def test_bad_config_exits_2_before_compute(tmp_path, args, message):
    out = run_train("--config", "configs/tiny.yaml", "--runs-dir", str(tmp_path), *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was created


@pytest.mark.slow
def test_short_run_writes_config_and_every_step_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_train("--config", "configs/tiny.yaml", "--runs-dir", str(tmp_path), "--run-id", "r", *SHORT)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "r"
    assert f"run directory: {run}" in out.stdout
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 24 and cfg["name"] == "tiny"

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/wd", "train/grad_norm", "train/step_time_ms",
                "train/tokens_per_sec", "train/tokens_seen", "train/stage", "eval/loss",
                "eval/perplexity", "eval/train_eval_gap"):
        assert tag in tags, tag
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 25))
    seen = {e.step: e.value for e in acc.Scalars("train/tokens_seen")}
    assert seen[24] == 24 * 8 * 64
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lr[1] == 0.0 and lr[5] == pytest.approx(4e-3)  # warm-up 4: lr(update 4) is the peak
    stage = {e.step: e.value for e in acc.Scalars("train/stage")}
    assert stage[12] == 1 and stage[13] == 2  # the update made at count 12 is stage 2
    assert [e.step for e in acc.Scalars("eval/loss")] == [12, 24]
    assert np.mean([e.value for e in loss[-6:]]) < loss[0].value


@pytest.mark.slow
def test_running_out_of_data_saves_and_stops_cleanly(tmp_path, shared_data, monkeypatch):
    """data.repeat=false: when the source is used up, the run saves its last step and exits 0 saying
    why, instead of dying with everything since the last checkpoint lost."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    # 60 paragraphs: enough for the held-out batch and a few training batches, far fewer than 200 steps
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n\n".join(text.split("\n\n")[:60]), encoding="utf-8")
    out = run_train("--config", "configs/tiny.yaml", "--runs-dir", str(tmp_path), "--run-id", "r", *SHORT,
                    "--set", "train.steps=200", "--set", "checkpoint.every=1000", "--set", "data.source=local",
                    "--set", f"data.data_files={corpus}", "--set", "data.repeat=false",
                    "--set", "data.text_column=text")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stopped by the end of the data (data.repeat=false) at step" in out.stdout
    last = int(out.stdout.split("stopped by the end of the data (data.repeat=false) at step ")[1].split()[0])
    assert 0 < last < 200
    assert (tmp_path / "r" / "checkpoints" / str(last)).is_dir()
    assert "resume with" not in out.stdout  # resuming in place would stop again at once
    # a whole command, with the interpreter that ran (.venv/bin/python after make train; issue 13, item 11)
    monkeypatch.chdir(REPO)  # the run's working directory
    more = command("python", "train.py", "--resume", tmp_path / "r" / "checkpoints" / str(last), "--run-id", "NEW_ID",
                   "--set", "data.data_files=...")
    assert f"(its stream starts afresh): {more} (or --set data.repeat=true)\n" in out.stdout


def test_a_new_run_whose_data_fails_in_the_training_stream_leaves_no_folder(tmp_path):
    """Issue 13, item 13: the held-out set (a.jsonl's first document) and the document after it read
    fine, so the start makes the run folder; the training stream then reads the malformed b.jsonl
    first. The run exits 2 with one error line, says in one line that it removed what its start made
    (the run folder, and runs/ it created), and leaves nothing behind."""
    data = tmp_path / "data"
    data.mkdir()
    held_out = json.dumps({"text": "The first document is held out for evaluation. " * 40})
    (data / "a.jsonl").write_text(held_out + "\n" + json.dumps({"text": "A short one."}) + "\n", encoding="utf-8")
    (data / "b.jsonl").write_text(json.dumps({"text": "Another short one."}) + "\n{not json\n", encoding="utf-8")
    out = run_train("--config", str(REPO / "configs" / "tiny.yaml"), "--run-id", "r", "--set", "data.source=local",
                    "--set", "data.data_files=[data/a.jsonl, data/b.jsonl]", "--set", "data.tokenize_batch=1",
                    "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "eval.batches=1",
                    "--set", "train.steps=4", "--set", "optim.warmup_steps=1", cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    run_dir = (tmp_path / "runs" / "r").resolve()
    assert out.stderr.splitlines() == [
        f"error: reading {data / 'a.jsonl'} (+1 more files) failed after 2 rows of this epoch, in {data / 'b.jsonl'}: "
        "ArrowInvalid: JSON "
        "parse error: Missing a name for object member. in row 1. Fix or remove the bad file (for a hub dataset, "
        "check the network and resume)",
        f"removed {run_dir}: the start failed before its first step and saved nothing"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no runs/r, and no runs/ either


# Runs a script as in a venv without torch: the path finder no longer sees torch, so `import torch`
# fails and importlib.util.find_spec("torch") is None (how transformers and datasets look for it).
NO_TORCH = """
import importlib.machinery, runpy, sys

class NoTorch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "torch" and not name.startswith("torch."):
            return importlib.machinery.PathFinder.find_spec(name, path, target)

    @staticmethod
    def find_distributions(*args, **kwargs):  # importlib.metadata: no torch distribution either
        for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            if dist.metadata["Name"] != "torch":
                yield dist

    @staticmethod
    def invalidate_caches():
        importlib.machinery.PathFinder.invalidate_caches()

sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_train_and_status_need_no_torch(tmp_path):
    """`make train` installs no torch (it is in the test extra only): training (with eval, samples,
    metrics and checkpoints) and status run with torch unimportable. (.ci/run also runs both in a real
    venv of the runtime dependencies.)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    short = ["--set", "train.steps=4", "--set", "optim.warmup_steps=1", "--set", "train.batch_size=2",
             "--set", "train.seq_len=32", "--set", "eval.every=2", "--set", "log.samples_every=2",
             "--set", "log.metrics_every=2", "--set", "checkpoint.every=2", "--set", "log.progress=false"]
    out = subprocess.run([sys.executable, "-c", NO_TORCH, str(REPO / "train.py"), "--config", "configs/tiny.yaml",
                          *short, "--runs-dir", str(tmp_path), "--run-id", "r"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    status = subprocess.run([sys.executable, "-c", NO_TORCH, str(REPO / "status.py"), str(tmp_path / "r"), "--json"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    assert '"state": "finished"' in status.stdout and '"step": 4' in status.stdout
