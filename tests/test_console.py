"""The console: progress lines with ETA, and a resumed run's progress bar starting at its step."""

import io
import re
import sys
from pathlib import Path

from bitnet_jax.console import MAX_SILENCE_S, Console, command
from bitnet_jax.hooks import StepInfo
from bitnet_jax.units import format_duration

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


def test_a_line_at_least_every_max_silence_s_whatever_print_every_says(capsys):
    """Issue 13, item 4: with log.print_every far apart, a slow run still prints a line once
    MAX_SILENCE_S (60 s) have passed since the last one; the clock is injected."""
    assert MAX_SILENCE_S == 60.0
    now = [1000.0]
    console = Console(total_steps=100, start_step=0, print_every=50, clock=lambda: now[0])
    at = {1: 1010.0,  # the session's first step prints at once and restarts the silence
          2: 1010.0 + MAX_SILENCE_S - 0.1, 3: 1010.0 + MAX_SILENCE_S,  # silent for 59.9 s, then 60 s: a line
          4: 1100.0, 5: 1070.0 + MAX_SILENCE_S - 0.01, 6: 1070.0 + MAX_SILENCE_S,
          50: 1131.0,  # print_every's own line restarts the silence too
          51: 1131.0 + MAX_SILENCE_S - 0.1, 52: 1131.0 + MAX_SILENCE_S + 5}
    for step, t in at.items():
        now[0] = t
        console.on_step(StepInfo(step, METRICS))
    out = capsys.readouterr().out.splitlines()
    assert [int(line.split("/")[0].split()[1]) for line in out] == [1, 3, 6, 50, 52]
    assert out[1] == f"step   3/100 | loss 3.2500 | lr 1.500e-03 | 4,096 tok/s | eta {format_duration(97 * 0.5)}"


class _Terminal:
    """stdout and stderr of one terminal: both streams write to one screen, where ``\\r`` returns to
    the start of the row and ``\\n`` starts the next one (what tqdm's bar relies on)."""

    def __init__(self):
        self.rows, self.row, self.col = [[]], 0, 0

    def stream(self):
        term = self

        class Stream:
            encoding = "utf-8"

            def write(self, text):
                term.put(text)
                return len(text)

            def flush(self):
                pass

            def isatty(self):
                return True

        return Stream()

    def put(self, text):
        for ch in text:
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row, self.col = self.row + 1, 0
                if self.row == len(self.rows):
                    self.rows.append([])
            else:
                line = self.rows[self.row]
                line.extend(" " * (self.col - len(line) + 1))
                line[self.col] = ch
                self.col += 1

    def screen(self):
        return ["".join(r).rstrip() for r in self.rows]


def test_in_a_terminal_the_lines_print_above_the_progress_bar(monkeypatch):
    """Issue 13, item 4: with stdout and stderr on one terminal, the tqdm bar (stderr) stays on the
    last row and every progress line (stdout) lands above it, whole, with no piece of the bar in it."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term.stream())
    monkeypatch.setattr(sys, "stderr", term.stream())
    console = Console(total_steps=10, start_step=0, print_every=4, bar=True)
    lines = ["step  1/10 | loss 3.2500 | lr 1.500e-03 | first step 0 s (compiling included)",
             "step  4/10 | loss 3.2500 | lr 1.500e-03 | 4,096 tok/s | eta 3 s",
             "step  8/10 | loss 3.2500 | lr 1.500e-03 | 4,096 tok/s | eta 1 s",
             "step 10/10 | loss 3.2500 | lr 1.500e-03 | 4,096 tok/s | eta 0 s"]
    for step in range(1, 11):
        console.on_step(StepInfo(step, METRICS))
        if step == 8:
            *above, bar = term.screen()
            assert above == lines[:3]
            assert re.match(r"train: +80%\|.*\| 8/10 \[.*loss=3.2500", bar), bar
    console.say("eval at step 10: loss 3.1000")
    console.close()
    screen = term.screen()
    assert screen[:5] == lines + ["eval at step 10: loss 3.1000"]
    assert re.match(r"train: 100%\|.*\| 10/10 \[", screen[5]) and screen[6:] == [""]


def test_every_command_the_summary_prints_uses_the_interpreter_that_runs(monkeypatch, tmp_path, capsys):
    """Issue 13, item 11: after `make train` the summary's commands (watch it, resume with, and the
    new run from the last step when the data ran out) start with .venv/bin/..., whole commands that
    work as written without an activated venv."""
    from bitnet_jax.run_dir import RunPaths
    from bitnet_jax.train_cli import print_summary

    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "tensorboard").touch()
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.chdir(tmp_path)
    paths = RunPaths(Path("runs") / "r")
    summary = {"first": (1, 8.0), "final_loss": 6.0, "step": 7, "total_steps": 20, "skipped": 0,
               "tokens_per_step": 128, "median_step_ms": 100.0, "stopped_by": "the end of the data (data.repeat=false)",
               "data_ran_out": True, "stop_seconds": 0.5}
    print_summary(paths, summary)
    out = capsys.readouterr().out.splitlines()
    assert "watch it:      .venv/bin/tensorboard --logdir runs/r/tb   or   .venv/bin/python status.py runs/r" in out
    assert ("to train on, start a new run from it with more data (its stream starts afresh): .venv/bin/python "
            "train.py --resume runs/r/checkpoints/7 --run-id NEW_ID --set data.data_files=... "
            "(or --set data.repeat=true)") in out
    print_summary(paths, {**summary, "stopped_by": "SIGTERM", "data_ran_out": False})
    assert "resume with:   .venv/bin/python train.py --resume runs/r" in capsys.readouterr().out.splitlines()
