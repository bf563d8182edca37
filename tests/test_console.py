"""The console: progress lines with ETA, and a resumed run's progress bar starting at its step."""

import io
import sys

from bitnet_jax.console import Console, command
from bitnet_jax.hooks import StepInfo

METRICS = {"loss": 3.25, "lr": 1.5e-3, "wd": 0.1, "grad_norm": 1.0, "stage": 1.0, "skipped": 0.0,
           "step_time_ms": 500.0, "tokens_per_sec": 4096.0, "tokens_seen": 0.0}


def test_progress_lines_every_n_steps_with_eta(capsys):
    console = Console(total_steps=10, start_step=0, print_every=4)
    for step in range(1, 11):
        console.on_step(StepInfo(step, {**METRICS, "mfu": 0.25}))
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "step  1/10 | loss 3.2500 | lr 1.500e-03 | first step 0 s (compiling included)",  # the first step always
        "step  4/10 | loss 3.2500 | lr 1.500e-03 | 4,096 tok/s | mfu 25.0% | eta 3 s",
        "step  8/10 | loss 3.2500 | lr 1.500e-03 | 4,096 tok/s | mfu 25.0% | eta 1 s",
        "step 10/10 | loss 3.2500 | lr 1.500e-03 | 4,096 tok/s | mfu 25.0% | eta 0 s",  # the last step always
    ]
    assert console.first == (1, 3.25) and console.skipped == 0


def test_a_resumed_runs_bar_starts_at_its_step_and_rates_this_session_only(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    console = Console(total_steps=1050, start_step=1046, print_every=0, bar=True)
    console.on_step(StepInfo(1047, METRICS))
    bar = console._bar
    assert (bar.n, bar.total) == (1047, 1050)
    shown = bar.format_meter(**{**bar.format_dict, "elapsed": 2.0, "rate": None})
    assert "1047/1050" in shown and "2.00s/step" in shown and "<00:06" in shown  # one step in 2 s, not 1047
    console.close()


def test_disabled_console_prints_nothing(capsys):
    console = Console(total_steps=4, start_step=0, print_every=1, enabled=False)
    console.on_step(StepInfo(4, METRICS))
    console.say("hello")
    console.block("title", [("a", 1)])
    assert capsys.readouterr().out == ""


def test_printed_commands_use_the_interpreter_that_runs(monkeypatch, tmp_path):
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "tensorboard").touch()
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.chdir(tmp_path)
    assert command("python", "status.py", "runs/x") == ".venv/bin/python status.py runs/x"
    assert command("tensorboard", "--logdir", "runs/x/tb") == ".venv/bin/tensorboard --logdir runs/x/tb"
    assert command("nonexistent-tool", "a") == "nonexistent-tool a"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # an interpreter outside the working directory: the plain name
    assert command("python", "train.py") == "python train.py"
