"""status.py on run directories written like the trainer writes them: tensorboardX event files,
config.yaml from the Config dataclass, checkpoint folders, samples.jsonl. Values are exact."""

from __future__ import annotations

import json
import os
import selectors
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboardX import SummaryWriter

from bitnet_jax import run_dir as rd
from bitnet_jax import config as config_lib
from bitnet_jax.console import command
from bitnet_jax.status import (
    PlotUnavailable,
    Run,
    RunDirError,
    build_status,
    format_duration,
    format_text,
    main,
    plot_run,
)

REPO = Path(__file__).resolve().parents[1]
F32 = lambda x: float(np.float32(x))  # noqa: E731  what a float logged by add_scalar reads back as
JSON_KEYS = {"run_id", "state", "step", "total_steps", "progress", "tokens_seen", "total_tokens", "loss", "lr",
             "wd", "grad_norm", "tokens_per_sec", "step_time_ms", "stage", "stage_name", "stage_switch",
             "eta_seconds", "last_eval", "samples", "anomalies", "checkpoints"}
PROMPTS = ["The quick brown fox", "Once upon a time"]


def write_config(run_dir: Path, steps=600, batch=4, seq=8, eval_every=50, samples_every=100, **extra) -> None:
    cfg = config_lib.Config(name="tiny")
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = steps, batch, seq
    cfg.eval.every, cfg.log.samples_every, cfg.checkpoint.every = eval_every, samples_every, 50
    cfg.log.prompts = list(PROMPTS)
    for key, value in extra.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_lib.dump(cfg))


def make_checkpoint(run_dir: Path, step: int) -> Path:
    """A step folder with the files of a finished save (what ``run_dir.complete_steps`` checks)."""
    folder = run_dir / "checkpoints" / str(step)
    for name in (rd.COMMIT_FILE, "_CHECKPOINT_METADATA", f"{rd.STATE}/_METADATA", f"{rd.STATE}/manifest.ocdbt",
                 f"{rd.DATA}/metadata", f"{rd.META}/metadata"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    assert rd.inspect_step(folder).problem is None, "the fake checkpoint no longer looks complete to run_dir.py"
    return folder


def step_time(s: int) -> float:
    return 100.0 + (s * 37) % 11  # varied, so a median differs from a mean or the last value


def loss_at(s: int) -> float:
    return 2.5 + 1.0 / s


def write_events(run_dir: Path, first: int, last: int, *, wall0: float, suffix: str = "", batch=4, seq=8,
                 switch=300, eval_every=50, samples_every=100, loss_shift=0.0, texts=True) -> None:
    """The trainer's tags for steps first..last: train/* every step, eval/time/samples periodically."""
    w = SummaryWriter(str(run_dir / "tb"), filename_suffix=suffix, flush_secs=3600, max_queue=100_000)
    wall = wall0
    for s in range(first, last + 1):
        wall += step_time(s) / 1000
        stage = 1 if s <= switch else 2  # the stage of the update that made step s (count s - 1)
        for tag, value in (("train/loss", loss_at(s) + loss_shift), ("train/lr", 1e-3 * (1 - s / 1000)),
                           ("train/wd", 0.1 if stage == 1 else 0.0), ("train/grad_norm", 0.5 + s / 1000),
                           ("train/step_time_ms", step_time(s)),
                           ("train/tokens_per_sec", batch * seq / (step_time(s) / 1000)),
                           ("train/tokens_seen", s * batch * seq), ("train/stage", stage)):
            w.add_scalar(tag, value, s, walltime=wall)
        if eval_every and s % eval_every == 0:
            w.add_scalar("eval/loss", 3.0 + s / 1000, s, walltime=wall)
            w.add_scalar("eval/perplexity", np.exp(3.0 + s / 1000), s, walltime=wall)
            w.add_scalar("eval/train_eval_gap", 0.0125, s, walltime=wall)
            w.add_scalar("time/eval_ms", 400.0, s, walltime=wall)
            w.add_scalar("time/checkpoint_ms", 20.0, s, walltime=wall)
        if texts and samples_every and s % samples_every == 0:
            for i in range(len(PROMPTS)):
                for mode in ("greedy", "typical", "stress"):
                    w.add_text(f"samples/{i}/{mode}", f"{mode} {i} at {s}\nline 2", s, walltime=wall)
            w.add_scalar("time/samples_ms", 900.0, s, walltime=wall)
    w.close()


def make_run(tmp_path: Path, name="tiny_T19.2K_1732700000", logged=150, steps=600, eval_every=50,
             samples_every=100) -> Path:
    run_dir = tmp_path / "runs" / name
    write_config(run_dir, steps=steps, eval_every=eval_every, samples_every=samples_every)
    if logged:
        write_events(run_dir, 1, logged, wall0=1_700_000_000.0, switch=steps // 2, eval_every=eval_every,
                     samples_every=samples_every)
    return run_dir


def status_of(run_dir: Path, **kw) -> dict:
    run = Run(run_dir)
    run.refresh()
    return build_status(run, **kw)


def fresh_now(run_dir: Path) -> float:
    """A "now" just after the run's last sign of life (so the state is decided by the test)."""
    run = Run(run_dir)
    run.refresh()
    return max(run.log.last_wall_time, run.log.last_modified) + 1.0


# --------------------------------------------------------------------------- the report's values

def test_running_run_reports_exact_progress_metrics_eta_eval_samples(tmp_path):
    run_dir = make_run(tmp_path)
    w = SummaryWriter(str(run_dir / "tb"), filename_suffix=".anomaly", flush_secs=3600)
    w.add_text("anomaly/loss_spike", "loss 9.1 (z=7.2)", 120, walltime=1_700_000_010.0)
    w.add_scalar("anomaly/count", 1, 120, walltime=1_700_000_010.0)
    w.close()
    for step in (50, 100):
        make_checkpoint(run_dir, step)
    (run_dir / "checkpoints" / "150.orbax-checkpoint-tmp-1732700000").mkdir()  # being saved
    (run_dir / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    st = status_of(run_dir, now=fresh_now(run_dir))

    median_ms = statistics.median(F32(step_time(s)) for s in range(51, 151))  # the last 100 steps
    median_tps = statistics.median(F32(32 / (step_time(s) / 1000)) for s in range(51, 151))
    # 450 steps left; eval (every 50, from the tags) 9 more times at 0.4 s, checkpoints 9 x 0.02 s,
    # samples ran once, so its interval is log.samples_every = 100: 5 more at 0.9 s.
    eta = 450 * median_ms / 1000 + 9 * 0.4 + 9 * 0.02 + 5 * 0.9
    assert set(st) >= JSON_KEYS
    assert {k: st[k] for k in ("run_id", "state", "step", "total_steps", "progress", "tokens_seen",
                               "total_tokens", "stage", "stage_name", "stage_switch", "checkpoints")} == {
        "run_id": "tiny_T19.2K_1732700000", "state": "running", "step": 150, "total_steps": 600,
        "progress": 0.25, "tokens_seen": 150 * 32, "total_tokens": 600 * 32, "stage": 1,
        "stage_name": "high LR + weight decay", "stage_switch": 300, "checkpoints": [50, 100]}
    assert st["checkpoints_saving"] == [150]
    assert st["loss"] == F32(loss_at(150))
    assert st["lr"] == F32(1e-3 * (1 - 150 / 1000))
    assert st["wd"] == F32(0.1)
    assert st["grad_norm"] == F32(0.65)
    assert st["step_time_ms"] == median_ms
    assert st["tokens_per_sec"] == median_tps
    assert st["eta_seconds"] == pytest.approx(eta, rel=1e-12)
    assert st["eta_periodic_seconds"] == pytest.approx(9 * 0.4 + 9 * 0.02 + 5 * 0.9, rel=1e-12)
    assert st["last_eval"] == {"step": 150, "eval_loss": F32(3.15), "gap": F32(0.0125),
                               "train_loss": F32(3.15) - F32(0.0125)}
    assert st["samples"] == {"step": 100, "items": [
        {"prompt": p, **{m: f"{m} {i} at 100\nline 2" for m in ("greedy", "typical", "stress")}}
        for i, p in enumerate(PROMPTS)]}
    assert st["anomalies"] == {"count": 1, "last": {"step": 120, "event": "loss_spike", "message": "loss 9.1 (z=7.2)"}}

    text = format_text(st).splitlines()
    assert text[0] == "Training Status: tiny_T19.2K_1732700000   [running]"
    assert text[1] == "Progress: 150 / 600 steps (25.0%)"
    assert text[2] == "Tokens:   4.80K / 19.20K"
    assert text[3] == "Current metrics (step 150):"
    assert text[4] == "  Loss 2.5067   LR 0.00085   WD 0.1   Grad norm 0.6500"
    assert text[5] == f"  Throughput {median_tps:,.0f} tokens/s   Step time {median_ms:.0f} ms"
    assert text[6] == "Stage: 1 (high LR + weight decay), switch after step 300"
    assert text[7].startswith(f"ETA: {format_duration(eta)} (incl. 8 s of eval/samples/checkpoints)")
    assert text[8] == "Last eval (step 150): eval loss 3.1500, train loss 3.1375, gap 0.0125"
    assert text[9] == "Recent samples (step 100):"
    assert text[10] == ('  "The quick brown fox" -> greedy: "greedy 0 at 100\\nline 2" | '
                        'typical: "typical 0 at 100\\nline 2" | stress: "stress 0 at 100\\nline 2"')
    assert text[12] == "Anomalies: 1 (last: loss_spike at step 120)    Checkpoints: 50, 100 (saving 150)"


def test_finished_run(tmp_path):
    run_dir = make_run(tmp_path, logged=20, steps=20, eval_every=10, samples_every=10)
    st = status_of(run_dir, now=fresh_now(run_dir) + 10**6)  # long after: finished, not stale
    assert (st["state"], st["step"], st["progress"], st["eta_seconds"]) == ("finished", 20, 1.0, 0.0)
    assert st["tokens_seen"] == st["total_tokens"] == 20 * 32
    assert st["stage_switch"] == 10 and st["stage"] == 2 and st["stage_name"] == "cooldown, no weight decay"
    assert "ETA: done" in format_text(st)


def test_stale_after_ten_step_times_plus_longest_hook_but_not_under_a_minute(tmp_path):
    run_dir = make_run(tmp_path)
    last = fresh_now(run_dir) - 1.0
    assert status_of(run_dir, now=last + 59)["state"] == "running"
    st = status_of(run_dir, now=last + 61)
    assert st["state"] == "stale" and st["seconds_since_update"] == pytest.approx(61)
    assert "[stale]" in format_text(st).splitlines()[0]
    assert "no new event for 1 min" in format_text(st)
    assert status_of(run_dir, now=last + 5, stale_after=4)["state"] == "stale"


def test_slow_steps_and_long_evals_raise_the_stale_threshold(tmp_path):
    run_dir = tmp_path / "slow"
    write_config(run_dir)
    w = SummaryWriter(str(run_dir / "tb"), flush_secs=3600)
    for s in range(1, 11):
        w.add_scalar("train/loss", 1.0, s, walltime=1_700_000_000.0 + s)
        w.add_scalar("train/step_time_ms", 8000.0, s, walltime=1_700_000_000.0 + s)
    w.add_scalar("time/eval_ms", 30_000.0, 10, walltime=1_700_000_010.0)
    w.close()
    last = fresh_now(run_dir) - 1.0
    # 10 x 8 s + the 30 s eval = 110 s
    assert status_of(run_dir, now=last + 109)["state"] == "running"
    assert status_of(run_dir, now=last + 111)["state"] == "stale"


def test_stage_two_after_the_switch(tmp_path):
    run_dir = make_run(tmp_path, logged=0)
    write_events(run_dir, 1, 420, wall0=1_700_000_000.0)
    st = status_of(run_dir)
    assert (st["step"], st["stage"], st["stage_switch"], st["wd"]) == (420, 2, 300, 0.0)
    assert "Stage: 2 (cooldown, no weight decay), switched after step 300" in format_text(st)


def test_stage_switch_from_config_and_stage_from_step_when_no_stage_tag(tmp_path):
    run_dir = tmp_path / "r"
    write_config(run_dir, optim__stage_switch=100)
    w = SummaryWriter(str(run_dir / "tb"), flush_secs=3600)
    for s in range(1, 121):
        w.add_scalar("train/loss", 2.0, s, walltime=1_700_000_000.0 + s)
    w.close()
    st = status_of(run_dir)
    assert (st["stage"], st["stage_switch"]) == (2, 100)
    # No step-time tag: the median gap between loss events (1 s) stands in.
    assert st["step_time_ms"] == 1000.0
    assert st["tokens_per_sec"] == 32.0
    assert st["eta_seconds"] == pytest.approx(480.0)


@pytest.mark.parametrize("last, stage", [(99, 1), (100, 1), (101, 2)])
def test_stage_from_step_matches_what_the_trainer_logs_at_the_switch(tmp_path, last, stage):
    """Step s is made by the update with count s - 1, which is stage 2 from count stage_switch on:
    step stage_switch itself is still stage 1 (as schedules.stage says for count stage_switch - 1)."""
    run_dir = tmp_path / "r"
    write_config(run_dir, optim__stage_switch=100)
    w = SummaryWriter(str(run_dir / "tb"), flush_secs=3600)
    for s in range(1, last + 1):
        w.add_scalar("train/loss", 2.0, s, walltime=1_700_000_000.0 + s)
    w.close()
    assert status_of(run_dir)["stage"] == stage


def test_stage_tag_written_by_the_helper_follows_the_trainer(tmp_path):
    from bitnet_jax import schedules

    run_dir = make_run(tmp_path, logged=0)
    write_events(run_dir, 1, 301, wall0=1_700_000_000.0)  # switch 300
    run = Run(run_dir)
    run.refresh()
    stage = run.log.scalars("train/stage")
    cfg = config_lib.Config(name="tiny")
    cfg.train.steps = 600
    # The trainer logs, at step s, the stage of the update with count s - 1 (train_state.make_train_step).
    assert [stage.at(s) for s in (299, 300, 301)] == [float(schedules.stage(cfg, s - 1)) for s in (299, 300, 301)]
    assert [stage.at(s) for s in (299, 300, 301)] == [1.0, 1.0, 2.0]
    assert (run.log.scalars("train/wd").at(300), run.log.scalars("train/wd").at(301)) == (F32(0.1), 0.0)


def test_only_complete_checkpoints_are_listed(tmp_path):
    run_dir = make_run(tmp_path, logged=10)
    make_checkpoint(run_dir, 5)
    make_checkpoint(run_dir, 10)
    (make_checkpoint(run_dir, 8) / rd.COMMIT_FILE).unlink()  # the save never finished
    (make_checkpoint(run_dir, 9) / rd.META / "metadata").write_text('{"step": ')  # truncated
    (run_dir / "checkpoints" / "7").mkdir()  # an empty step folder
    (run_dir / "checkpoints" / "12.orbax-checkpoint-tmp-1732700000").mkdir()  # being saved
    st = status_of(run_dir)
    assert (st["checkpoints"], st["checkpoints_saving"]) == ([5, 10], [12])
    assert st["checkpoints"] == rd.complete_steps(run_dir)  # what --resume latest would pick from


def test_status_does_not_import_jax(tmp_path):
    run_dir = make_run(tmp_path, logged=10)
    make_checkpoint(run_dir, 10)
    code = ("import sys; from bitnet_jax.status import main; main([sys.argv[1], '--json']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'orbax')))")
    p = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr
    *report, modules = p.stdout.splitlines()
    assert json.loads("\n".join(report))["checkpoints"] == [10] and modules == "[]"


def test_watch_rereads_config_yaml_when_it_changes(tmp_path):
    run_dir = make_run(tmp_path, logged=10)
    run = Run(run_dir)
    run.refresh()
    config = run.config
    run.refresh()
    assert run.config is config and config.get("train.steps") == 600  # unchanged: not read again
    path = run_dir / "config.yaml"
    mtime = path.stat().st_mtime_ns
    write_config(run_dir, steps=1200)  # e.g. a resume with a longer --set train.steps
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a new mtime even on a coarse-clock file system
    run.refresh()
    assert run.config.get("train.steps") == 1200 and run.config.get("stage_switch") == 600
    assert build_status(run)["total_steps"] == 1200
    path.unlink()
    run.refresh()
    assert run.config is None and "config.yaml not found" in run.config_notes[0]


def test_no_eval_and_no_samples_yet_say_so(tmp_path):
    run_dir = make_run(tmp_path, logged=0)
    write_events(run_dir, 1, 30, wall0=1_700_000_000.0)  # eval every 50: none yet
    st = status_of(run_dir)
    assert (st["last_eval"], st["samples"], st["checkpoints"]) == (None, None, [])
    assert st["anomalies"] == {"count": 0, "last": None}
    text = format_text(st)
    assert "Last eval: none yet" in text and "Recent samples: none yet" in text
    assert "Anomalies: 0    Checkpoints: none yet" in text


def test_no_events_yet(tmp_path):
    run_dir = make_run(tmp_path, logged=0)
    (run_dir / "tb").mkdir()
    st = status_of(run_dir)
    assert (st["state"], st["step"], st["total_steps"], st["tokens_seen"], st["eta_seconds"]) == (
        "running", None, 600, None, None)
    assert "Progress: no training step logged yet (0 / 600 steps)" in format_text(st)


def test_restart_overlap_and_half_written_record_read_the_newest_values(tmp_path):
    run_dir = make_run(tmp_path, logged=0)
    write_events(run_dir, 1, 130, wall0=1_700_000_000.0, suffix=".0")  # died at 130
    write_events(run_dir, 101, 160, wall0=1_700_000_100.0, suffix=".1", loss_shift=1.0)  # resumed from 100
    newest = sorted((run_dir / "tb").iterdir())[-1]
    with open(newest, "ab") as f:  # the writer is in the middle of the next record
        f.write((60).to_bytes(8, "little") + b"\x00\x01\x02\x03\x09half")
    run = Run(run_dir)
    run.refresh()
    st = build_status(run)
    assert st["step"] == 160 and st["loss"] == F32(loss_at(160) + 1.0)
    loss = run.log.scalars("train/loss")
    assert loss.steps.tolist() == list(range(1, 161))
    assert loss.values[99] == F32(loss_at(100)) and loss.values[100] == F32(loss_at(101) + 1.0)
    assert run.log.scalars("eval/loss").steps.tolist() == [50, 100, 150]


def test_samples_fall_back_to_samples_jsonl(tmp_path):
    run_dir = tmp_path / "r"
    write_events(run_dir, 1, 30, wall0=1_700_000_000.0, texts=False)  # no config.yaml either
    lines = [json.dumps({"step": s, "prompt_index": i, "prompt": f"p{i}", "mode": m, "text": f"{m}{s}"})
             for s in (10, 20) for i in range(2) for m in ("greedy", "typical")]
    (run_dir / "samples.jsonl").write_text("\n".join(lines) + '\n{"step": 30, "prompt_')  # mid-write
    st = status_of(run_dir)
    assert st["samples"] == {"step": 20, "items": [
        {"prompt": "p0", "greedy": "greedy20", "typical": "typical20", "stress": None},
        {"prompt": "p1", "greedy": "greedy20", "typical": "typical20", "stress": None}]}
    assert st["total_steps"] is None and st["tokens_seen"] == 30 * 32  # from train/tokens_seen
    assert st["notes"] == ["config.yaml not found: totals, tokens and the stage switch are unknown"]
    assert "Progress: 30 steps (total unknown)" in format_text(st)


def test_anomaly_dumps_count_when_no_anomaly_events(tmp_path):
    run_dir = make_run(tmp_path, logged=10)
    for name in ("3_nan_loss", "7_grad_spike"):
        (run_dir / "anomalies" / name).mkdir(parents=True)
    assert status_of(run_dir)["anomalies"] == {"count": 2, "last": {"step": 7, "event": "grad_spike", "message": None}}


def test_watch_refresh_reads_only_new_bytes(tmp_path):
    run_dir = make_run(tmp_path, logged=40)
    run = Run(run_dir)
    first = run.refresh()
    assert first > 40 * 8 and run.refresh() == 0
    write_events(run_dir, 31, 60, wall0=1_700_000_100.0, suffix=".resumed")
    new_file = [p for p in run_dir.joinpath("tb").iterdir() if p.name.endswith(".resumed")][0]
    records_in_new_file = run.refresh()
    assert records_in_new_file == run.log.readers[new_file].records
    assert all(r.offset == r.path.stat().st_size for r in run.log.readers.values())
    assert build_status(run)["step"] == 60


def test_format_duration():
    assert [format_duration(x) for x in (None, 4.4, 59.4, 61, 3539, 3600 * 5 + 60 * 7, 86400 * 2 + 3600 * 3)] == [
        "unknown", "4 s", "59 s", "1 min", "59 min", "5 h 07 min", "2 d 3 h"]


# --------------------------------------------------------------------------- directories that are not runs

def test_missing_empty_and_parent_directories_are_clear_errors(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        Run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="is empty"):
        Run(tmp_path / "empty")
    run_dir = make_run(tmp_path, logged=0)
    with pytest.raises(RunDirError, match=f"holds 1 run.*{run_dir.name}") as info:
        Run(run_dir.parent)
    # the hint is a whole command, with the interpreter that runs (issue 13, item 11)
    assert str(info.value).endswith(f"e.g. {command('python', 'status.py', run_dir)}")


# --------------------------------------------------------------------------- plot

def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = make_run(tmp_path, logged=400)
    run = Run(run_dir)
    run.refresh()
    out = tmp_path / "curves.png"
    plot_run(run, build_status(run), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    run_dir = make_run(tmp_path, logged=10)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = Run(run_dir)
    run.refresh()
    with pytest.raises(PlotUnavailable, match=r"pip install 'bitnet-jax\[plot\]'"):
        plot_run(run, build_status(run), tmp_path / "x.png")
    assert main([str(run_dir), "--plot", str(tmp_path / "x.png")]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("Training Status:") and "matplotlib" in err and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- the CLI, as a subprocess

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "status.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_cli_text_report(tmp_path):
    run_dir = make_run(tmp_path)
    p = run_cli(str(run_dir))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("Training Status: tiny_T19.2K_1732700000   [")
    assert "Progress: 150 / 600 steps (25.0%)" in lines
    assert "Last eval (step 150): eval loss 3.1500, train loss 3.1375, gap 0.0125" in lines


def test_cli_json_has_every_documented_key(tmp_path):
    run_dir = make_run(tmp_path, logged=20, steps=20, eval_every=10, samples_every=10)
    make_checkpoint(run_dir, 20)
    p = run_cli(str(run_dir), "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert set(st) >= JSON_KEYS
    assert (st["state"], st["step"], st["total_steps"], st["progress"], st["checkpoints"]) == (
        "finished", 20, 20, 1.0, [20])
    assert st["last_eval"] == {"step": 20, "eval_loss": F32(3.02), "train_loss": F32(3.02) - F32(0.0125),
                               "gap": F32(0.0125)}
    assert [item["prompt"] for item in st["samples"]["items"]] == PROMPTS


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_cli_exits_2_on_a_missing_or_empty_run_directory(tmp_path, kind):
    path = tmp_path / "runs" / "nothing_here"
    if kind == "empty":
        path.mkdir(parents=True)
    p = run_cli(str(path), "--json")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("status.py: error: ") and str(path) in p.stderr
    assert ("does not exist" if kind == "missing" else "is empty") in p.stderr


def test_cli_watch_refreshes_until_the_run_finishes(tmp_path):
    run_dir = make_run(tmp_path, logged=10, steps=20, eval_every=10, samples_every=10)
    proc = subprocess.Popen([sys.executable, str(REPO / "status.py"), str(run_dir), "--json", "--watch", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=60), "no first report within 60 s"
        first = json.loads(proc.stdout.readline())
        assert (first["state"], first["step"]) == ("running", 10)
        write_events(run_dir, 11, 20, wall0=1_700_000_100.0, suffix=".more", eval_every=10, samples_every=10)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    last = json.loads(out.splitlines()[-1])  # one JSON object a line while watching
    assert (last["state"], last["step"], last["progress"]) == ("finished", 20, 1.0)


# --------------------------------------------------------------------------- end to end with the trainer

@pytest.mark.slow
def test_status_reads_a_real_train_py_run(tmp_path):
    train, tiny = REPO / "train.py", REPO / "configs" / "tiny.yaml"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    overrides = ["train.steps=20", "optim.warmup_steps=5", "eval.every=10", "log.samples_every=10",
                 "log.metrics_every=10", "checkpoint.every=10"]
    p = subprocess.run([sys.executable, str(train), "--config", str(tiny), "--runs-dir", str(tmp_path / "runs"),
                        *[a for o in overrides for a in ("--set", o)]],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()] if (tmp_path / "runs").is_dir() else []
    assert len(runs) == 1, f"expected one run under {tmp_path / 'runs'}: {runs}"
    text = run_cli(str(runs[0]))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == f"Training Status: {runs[0].name}   [finished]"
    st = json.loads(run_cli(str(runs[0]), "--json").stdout)
    cfg = config_lib.load(tiny, overrides)
    assert (st["state"], st["step"], st["total_steps"]) == ("finished", 20, 20)
    assert st["tokens_seen"] == st["total_tokens"] == 20 * cfg.train.batch_size * cfg.train.seq_len
    assert st["last_eval"]["step"] == 20 and st["stage"] == 2
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(runs[0] / "tb"), size_guidance=dict(ea.STORE_EVERYTHING_SIZE_GUIDANCE))
    acc.Reload()
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        assert st[key] == acc.Scalars(tag)[-1].value
    assert st["last_eval"]["eval_loss"] == acc.Scalars("eval/loss")[-1].value
    assert 20 in st["checkpoints"] and st["checkpoints"] == rd.complete_steps(runs[0])
    assert st["samples"]["step"] == 20 and len(st["samples"]["items"]) == len(cfg.log.prompts)
    assert [item["prompt"] for item in st["samples"]["items"]] == cfg.log.prompts
    assert all(isinstance(item[mode], str) for item in st["samples"]["items"] for mode in ("greedy", "typical", "stress"))


# --------------------------------------------------------------------------- how a run ended, or never started

def test_a_config_yaml_that_is_not_utf8_is_a_note_not_a_traceback(tmp_path):
    run_dir = make_run(tmp_path, logged=10)
    raw = b"train:\n  steps: 600\n# caf\xe9 in latin-1\n"
    (run_dir / "config.yaml").write_bytes(raw)
    p = run_cli(str(run_dir), "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert (st["step"], st["total_steps"], st["total_tokens"]) == (10, None, None)
    assert st["notes"] == [f"config.yaml is not UTF-8 text (byte {raw.index(0xE9)} is 0xe9): totals unknown"]


def test_a_halted_run_says_halted_at_its_step_and_why_however_long_ago(tmp_path):
    from bitnet_jax.end_record import write_end_record

    run_dir = make_run(tmp_path)
    last = fresh_now(run_dir) - 1.0
    write_end_record(run_dir, "halted", 150, "non-finite loss (train.on_nan: halt)", 3, now=last + 0.5)
    for now in (last + 5, last + 10**6):  # never running, never stale: the trainer said it exited
        st = status_of(run_dir, now=now)
        assert st["state"] == "halted"
        assert st["end"] == {"state": "halted", "step": 150, "reason": "non-finite loss (train.on_nan: halt)",
                             "exit_code": 3, "time": last + 0.5}
    text = format_text(st).splitlines()
    assert text[:2] == ["Training Status: tiny_T19.2K_1732700000   [halted]",
                        "  halted at step 150 (non-finite loss (train.on_nan: halt)), exit code 3"]
    assert any(line.startswith("ETA: ") and "of work left, if it resumes" in line for line in text)
    p = run_cli(str(run_dir), "--json", "--watch", "0.05")  # watching ends: the trainer has exited
    assert p.returncode == 0 and json.loads(p.stdout.splitlines()[-1])["state"] == "halted"


def test_an_end_record_older_than_the_newest_event_is_ignored(tmp_path):
    """A resume after the halt logs newer events: the old end.json no longer describes the run."""
    from bitnet_jax.end_record import write_end_record

    run_dir = make_run(tmp_path, logged=100)
    write_end_record(run_dir, "stopped", 100, "SIGTERM", 0, now=fresh_now(run_dir))
    assert status_of(run_dir)["state"] == "stopped"
    write_events(run_dir, 101, 150, wall0=fresh_now(run_dir) + 30, suffix=".resumed")
    st = status_of(run_dir, now=fresh_now(run_dir))
    assert (st["state"], st["step"], st["end"]) == ("running", 150, None)


def test_a_damaged_end_record_is_a_note(tmp_path):
    run_dir = make_run(tmp_path, logged=10)
    (run_dir / "end.json").write_text('{"state": "halted", "step": ')
    st = status_of(run_dir, now=fresh_now(run_dir))
    assert (st["state"], st["end"]) == ("running", None)
    assert st["notes"] == ["end.json is not JSON: ignored"]


def test_a_folder_from_a_failed_start_is_not_started_once_the_start_window_passed(tmp_path):
    """config.yaml and tokenizer/ but no step and no checkpoint: `running` while a start could still
    be compiling or loading data (START_WINDOW_S), then `not started`, never `stale`."""
    from bitnet_jax.status.report import START_WINDOW_S

    run_dir = tmp_path / "runs" / "tiny_T19.2K_1732700000"
    write_config(run_dir)
    (run_dir / "tokenizer").mkdir()
    newest = max(p.stat().st_mtime for p in (run_dir, run_dir / "config.yaml"))
    assert status_of(run_dir, now=newest + START_WINDOW_S - 1)["state"] == "running"
    st = status_of(run_dir, now=newest + START_WINDOW_S + 1)
    assert (st["state"], st["step"], st["checkpoints"]) == ("not started", None, [])
    assert format_text(st).splitlines()[:2] == [
        "Training Status: tiny_T19.2K_1732700000   [not started]",
        "  no training step and no checkpoint, and nothing written for 10 min: the start failed or was "
        "stopped before step 1 (see the trainer's output)"]
    make_checkpoint(run_dir, 50)  # it trained once (its tb/ is gone): a run that stopped, not one that never began
    assert status_of(run_dir, now=newest + START_WINDOW_S + 1)["state"] == "stale"


# --------------------------------------------------------------------------- event files: damage, new sample tags

def test_a_record_damaged_in_the_middle_of_a_real_event_file_is_read_past_and_reported(tmp_path):
    run_dir = make_run(tmp_path)
    (path,) = (run_dir / "tb").iterdir()
    buf = bytearray(path.read_bytes())
    middle = len(buf) // 2
    buf[middle: middle + 8] = b"\xde\xad\xbe\xef" * 2  # inside one record of about step 75
    path.write_bytes(bytes(buf))
    run = Run(run_dir)
    run.refresh()
    st = build_status(run, now=fresh_now(run_dir))
    loss = run.log.scalars("train/loss")
    assert st["step"] == 150 and st["loss"] == F32(loss_at(150))  # read to the end, not cut at the damage
    assert len(loss) in (149, 150)  # at most the one record of train/loss around the damage is lost
    ((_, offset, size),) = run.log.damaged
    assert offset <= middle < offset + size < offset + 200
    assert st["notes"] == [f"tb/{path.name} is damaged: read on past the unreadable bytes at offset "
                           f"{offset:,} ({size:,} bytes); the events in them are lost"]


def test_samples_written_as_the_trainer_writes_them_read_back_exactly(tmp_path):
    from bitnet_jax.metrics import TensorBoard
    from bitnet_jax.sample_text import sample_markdown, sample_tag

    run_dir = tmp_path / "r"
    write_events(run_dir, 1, 20, wall0=1_700_000_000.0, texts=False)  # no config.yaml: prompts from the tags
    tb = TensorBoard(run_dir / "tb")
    prompts = ["* a bullet?", "Line one\nline two"]
    texts = {(i, m): f"\n  {m} `x` <b>{i}</b>\n\n" for i in range(2) for m in ("greedy", "typical", "stress")}
    for (i, mode), text in texts.items():
        tb.text(20, sample_tag(i, prompts[i], mode), sample_markdown(i, prompts[i], mode, text, 20))
    tb.close()
    st = status_of(run_dir)
    assert st["samples"] == {"step": 20, "items": [
        {"prompt": prompts[i], **{m: texts[i, m] for m in ("greedy", "typical", "stress")}} for i in range(2)]}
