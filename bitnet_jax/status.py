"""``status.py RUN_DIR``: a training run's progress, metrics, ETA, evals, samples and checkpoints.

Reads the run directory's files only (config.yaml, tb/ event files, checkpoints/, samples.jsonl,
anomalies/) and never talks to the trainer, so it works on a live run, a finished one and a dead
one alike. ``build_status`` returns the report as a dict (the ``--json`` output); ``format_text``
renders it; ``plot_run`` draws the curves; ``main`` is the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bitnet_jax.run_dir import complete_steps  # files only: status never imports jax or Orbax
from bitnet_jax.eventfile import EventLog, Series, is_event_file

STAGE_NAMES = {1: "high LR + weight decay", 2: "cooldown, no weight decay"}
RECENT_STEPS = 100  # the "recent window" for median step time and throughput
STALE_STEP_TIMES = 10  # no new event for this many median step times (and not finished): stale
MIN_STALE_S = 60.0  # ... but never sooner: event writers buffer, a live run can be quiet this long
NO_STEP_TIME_STALE_S = 600.0  # before the first step is logged (compiling, loading data)
HOOK_INTERVAL_KEYS = {  # time/<hook>_ms -> the config key of its interval, when it ran too few times
    "eval": ("eval", "every"),
    "samples": ("log", "samples_every"),
    "metrics": ("log", "metrics_every"),
    "checkpoint": ("checkpoint", "every"),
}
_SAMPLE_TAG = re.compile(r"^samples/(\d+)/([^/]+)$")
SAMPLE_MODES = ("greedy", "typical", "stress")


class RunDirError(Exception):
    """RUN_DIR is missing or is not a run directory (the CLI exits 2 with this message)."""


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


# --------------------------------------------------------------------------- the run's config

@dataclasses.dataclass
class RunConfig:
    """The config.yaml keys status reads; read leniently (any missing key is None)."""

    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    # Resolved: optim.stage_switch, or train.steps // 2 when null. The update with count stage_switch
    # is the first of stage 2, and the trainer logs update count t as step t + 1, so stage_switch is
    # the last logged step of stage 1.
    stage_switch: int | None = None
    prompts: list[str] = dataclasses.field(default_factory=list)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        def get(section: str, key: str, kind: type = int):
            value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        steps = get("train", "steps")
        switch = get("optim", "stage_switch")
        if switch is None and steps is not None:
            switch = steps // 2
        prompts = (data.get("log") or {}).get("prompts") if isinstance(data.get("log"), dict) else None
        if isinstance(prompts, str):
            prompts = [prompts]
        return cls(steps, get("train", "batch_size"), get("train", "seq_len"), switch,
                   [str(p) for p in prompts or []], data)

    def get(self, section: str, key: str) -> Any:
        sec = self.raw.get(section)
        return sec.get(key) if isinstance(sec, dict) else None

    @property
    def tokens_per_step(self) -> int | None:
        if self.batch_size is None or self.seq_len is None:
            return None
        return self.batch_size * self.seq_len


def load_config(path: Path) -> tuple[RunConfig | None, str | None]:
    """``(config, None)``, or ``(None, why not)`` when config.yaml is missing or unreadable."""
    if not path.is_file():
        return None, f"{path.name} not found: totals, tokens and the stage switch are unknown"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        return None, f"{path.name} could not be read ({e.__class__.__name__}): totals unknown"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a mapping of config sections: totals unknown"
    return RunConfig.from_dict(data), None


# --------------------------------------------------------------------------- the run directory

RUN_FILES = ("config.yaml", "tb", "provenance.json", "dataset_fingerprint.json", "checkpoints", "samples.jsonl")


def _looks_like_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def check_run_dir(path: Path) -> None:
    """Raises RunDirError with what to do when ``path`` is not a readable run directory."""
    if not path.exists():
        raise RunDirError(f"run directory {path} does not exist (expected runs/<run_id>/ as written by train.py)")
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory; pass a run directory such as runs/<run_id>/")
    try:
        entries = list(path.iterdir())
    except PermissionError as e:
        raise RunDirError(f"cannot read {path}: {e}") from None
    if not entries:
        raise RunDirError(
            f"run directory {path} is empty: no config.yaml and no tb/ event files yet "
            "(a run writes them within seconds of starting; check that train.py is running and writing here: "
            "--runs-dir/--run-id)"
        )
    if _looks_like_run(path) or any(is_event_file(p) for p in entries):
        return
    runs = sorted((p for p in entries if p.is_dir() and _looks_like_run(p)), key=lambda p: p.stat().st_mtime)
    if runs:
        raise RunDirError(
            f"{path} holds {len(runs)} run(s), not a single run; pass one of them, e.g. status.py {runs[-1]}"
        )
    raise RunDirError(f"{path} is not a run directory: it has none of {', '.join(RUN_FILES)} "
                      "(expected runs/<run_id>/ as written by train.py)")


class Run:
    """A run directory, read incrementally: each ``refresh()`` reads only what was appended."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        check_run_dir(self.path)
        self.run_id = self.path.resolve().name
        tb = self.path / "tb"
        self.log = EventLog(tb if tb.is_dir() or not any(map(is_event_file, self.path.iterdir())) else self.path)
        self.config: RunConfig | None = None
        self.config_note: str | None = None
        self._config_stamp: tuple[int, int] | None = None  # config.yaml's (mtime_ns, size) when read

    def refresh(self) -> int:
        """Reads new event bytes (and config.yaml when it appears or changes); returns the new
        record count."""
        if not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} disappeared")
        path = self.path / "config.yaml"
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if self.config is None or stamp != self._config_stamp:
            self.config, self.config_note = load_config(path)
            self._config_stamp = stamp
        return self.log.update()

    # ----------------------------------------------------------------- files besides the events

    def checkpoints(self) -> tuple[list[int], list[int]]:
        """(complete checkpoint steps, steps being saved now), both sorted. Complete means what
        ``--resume latest`` would accept (``checkpoint.complete_steps``): a step folder from an
        unfinished or damaged save is not listed."""
        folder = self.path / "checkpoints"
        done = complete_steps(self.path)
        saving = []
        if folder.is_dir():
            for p in folder.iterdir():
                if "orbax-checkpoint-tmp" in p.name and p.is_dir():
                    m = re.match(r"(\d+)", p.name)
                    if m:
                        saving.append(int(m.group(1)))
        return done, sorted(set(saving) - set(done))

    def anomaly_dumps(self) -> list[tuple[int, str]]:
        """(step, event) of each anomalies/<step>_<event>/ folder, by step."""
        folder = self.path / "anomalies"
        out = []
        if folder.is_dir():
            for p in folder.iterdir():
                m = re.match(r"(\d+)_(.+)$", p.name)
                if m and p.is_dir():
                    out.append((int(m.group(1)), m.group(2)))
        return sorted(out)

    def jsonl_samples(self) -> list[dict[str, Any]]:
        """The records of samples.jsonl (lines that are not complete JSON objects are skipped)."""
        path = self.path / "samples.jsonl"
        out = []
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # the writer may be mid-line
                    if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                        out.append(rec)
        return out


# --------------------------------------------------------------------------- the report

def _num(x: float | None) -> float | None:
    """JSON-safe float: non-finite values become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _median_recent(series: Series | None, n: int = RECENT_STEPS) -> float | None:
    if series is None or not len(series):
        return None
    v = series.values[-n:]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def _hook_costs(run: Run, step: int, total: int) -> tuple[float, float]:
    """(seconds of periodic work still to come, the longest recent hook in seconds), from the
    ``time/<hook>`` tags: each hook's median cost times how often it will still run."""
    remaining_s = longest_s = 0.0
    for tag in run.log.tags():
        if not tag.startswith("time/"):
            continue
        hook = tag[len("time/"):].removesuffix("_ms")
        s = run.log.scalars(tag)
        if s is None or not len(s):
            continue
        cost = _median_recent(s, 10)
        if cost is None:
            continue
        longest_s = max(longest_s, float(np.nanmax(s.values[-10:])) / 1000)
        interval = None
        if len(s) >= 2:
            interval = int(np.median(np.diff(s.steps[-11:])))
        elif run.config is not None and hook in HOOK_INTERVAL_KEYS:
            value = run.config.get(*HOOK_INTERVAL_KEYS[hook])
            interval = value if isinstance(value, int) else None
        if interval and interval > 0:
            runs_left = total // interval - step // interval
            remaining_s += max(runs_left, 0) * cost / 1000
    return remaining_s, longest_s


def _last_eval(run: Run) -> dict[str, Any] | None:
    ev = run.log.scalars("eval/loss")
    if ev is None or not len(ev):
        return None
    step = ev.last_step
    eval_loss = ev.last_value
    gap_s = run.log.scalars("eval/train_eval_gap")
    gap = gap_s.at(step) if gap_s is not None else None
    train_loss = eval_loss - gap if gap is not None else None
    return {"step": step, "eval_loss": _num(eval_loss), "train_loss": _num(train_loss), "gap": _num(gap)}


def _samples(run: Run) -> dict[str, Any] | None:
    """The latest samples: from the tb text events, else from samples.jsonl."""
    by_step: dict[int, dict[int, dict[str, str]]] = {}
    for tag, events in run.log.texts().items():
        m = _SAMPLE_TAG.match(tag)
        if m:
            for ev in events:
                by_step.setdefault(ev.step, {}).setdefault(int(m.group(1)), {})[m.group(2)] = ev.text
    jsonl: list[dict[str, Any]] | None = None
    if not by_step:
        jsonl = run.jsonl_samples()
        for rec in jsonl:
            if isinstance(rec.get("prompt_index"), int) and isinstance(rec.get("mode"), str):
                slot = by_step.setdefault(rec["step"], {}).setdefault(rec["prompt_index"], {})
                slot[rec["mode"]] = str(rec.get("text", ""))
    if not by_step:
        return None
    step = max(by_step)
    prompts = list(run.config.prompts) if run.config is not None else []
    items = []
    for index in sorted(by_step[step]):
        modes = by_step[step][index]
        prompt = prompts[index] if index < len(prompts) else None
        if prompt is None:
            if jsonl is None:
                jsonl = run.jsonl_samples()
            prompt = next((r.get("prompt") for r in reversed(jsonl)
                           if r.get("prompt_index") == index and isinstance(r.get("prompt"), str)), None)
        item = {"prompt": prompt}
        item.update({mode: modes.get(mode) for mode in SAMPLE_MODES})
        item.update({mode: text for mode, text in modes.items() if mode not in SAMPLE_MODES})
        items.append(item)
    return {"step": step, "items": items}


def _anomalies(run: Run) -> dict[str, Any]:
    events = [(ev.step, tag[len("anomaly/"):], ev.text) for tag, evs in run.log.texts().items()
              if tag.startswith("anomaly/") for ev in evs]
    events.sort(key=lambda e: e[0])
    dumps = run.anomaly_dumps()
    counter = run.log.scalars("anomaly/count")
    if counter is not None and len(counter) and math.isfinite(counter.last_value):
        count = int(counter.last_value)
    else:
        count = len(events) or len(dumps)
    last = None
    if events:
        last = {"step": events[-1][0], "event": events[-1][1], "message": events[-1][2]}
    elif dumps:
        last = {"step": dumps[-1][0], "event": dumps[-1][1], "message": None}
    return {"count": count, "last": last}


def build_status(run: Run, now: float | None = None, stale_after: float | None = None) -> dict[str, Any]:
    """The report as a dict: the ``--json`` output (keys documented in the README)."""
    now = time.time() if now is None else now
    cfg, log = run.config, run.log
    notes = [run.config_note] if run.config_note else []

    loss = log.scalars("train/loss")
    if loss is not None and len(loss):
        step = loss.last_step
    else:  # no loss logged (yet): the newest step of any train/ scalar
        steps = [s.last_step for t in log.tags() if t.startswith("train/")
                 for s in [log.scalars(t)] if s is not None and len(s)]
        step = max(steps) if steps else None
    total = cfg.steps if cfg else None
    per_step = cfg.tokens_per_step if cfg else None

    def last(tag: str) -> float | None:
        s = log.scalars(tag)
        return _num(s.last_value) if s is not None and len(s) else None

    if step is not None and per_step is not None:
        tokens_seen = step * per_step
    else:
        seen = last("train/tokens_seen")
        tokens_seen = int(seen) if seen is not None else None
    total_tokens = total * per_step if total is not None and per_step is not None else None

    step_time_ms = _median_recent(log.scalars("train/step_time_ms"))
    if step_time_ms is None and loss is not None and len(loss) > 1:
        dt = np.diff(loss.wall_times[-RECENT_STEPS - 1:]) / np.maximum(np.diff(loss.steps[-RECENT_STEPS - 1:]), 1)
        step_time_ms = float(np.median(dt)) * 1000
    tokens_per_sec = _median_recent(log.scalars("train/tokens_per_sec"))
    if tokens_per_sec is None and step_time_ms and per_step:
        tokens_per_sec = per_step / (step_time_ms / 1000)

    stage_value = last("train/stage")
    switch = cfg.stage_switch if cfg else None
    if stage_value is not None:
        stage = int(round(stage_value))
    elif step is not None and switch is not None:
        stage = 1 if step <= switch else 2  # step == stage_switch is stage 1's last update
    else:
        stage = None

    finished = step is not None and total is not None and step >= total
    hooks_left_s, longest_hook_s = (_hook_costs(run, step, total) if step is not None and total is not None
                                    else (0.0, 0.0))
    times = [t for t in (log.last_wall_time, log.last_modified) if t is not None]
    last_update = max(times) if times else None
    if last_update is None:  # nothing logged yet: the run started when its files were written
        stamps = [p.stat().st_mtime for p in (run.path / "config.yaml", run.path) if p.exists()]
        last_update = max(stamps) if stamps else None
    since_update = max(0.0, now - last_update) if last_update is not None else None
    if stale_after is None:
        stale_after = (max(MIN_STALE_S, STALE_STEP_TIMES * step_time_ms / 1000 + longest_hook_s)
                       if step_time_ms else NO_STEP_TIME_STALE_S)
    if finished:
        state = "finished"
    elif since_update is not None and since_update > stale_after:
        state = "stale"
    else:
        state = "running"

    if finished:
        eta = 0.0
    elif step is not None and total is not None and step_time_ms is not None:
        eta = (total - step) * step_time_ms / 1000 + hooks_left_s
    else:
        eta = None

    ckpts, saving = run.checkpoints()
    return {
        "run_id": run.run_id,
        "state": state,
        "step": step,
        "total_steps": total,
        "progress": (step / total if step is not None and total else None),
        "tokens_seen": tokens_seen,
        "total_tokens": total_tokens,
        "loss": last("train/loss"),
        "lr": last("train/lr"),
        "wd": last("train/wd"),
        "grad_norm": last("train/grad_norm"),
        "tokens_per_sec": _num(tokens_per_sec),
        "step_time_ms": _num(step_time_ms),
        "stage": stage,
        "stage_name": STAGE_NAMES.get(stage) if stage is not None else None,
        "stage_switch": switch,
        "eta_seconds": _num(eta),
        "last_eval": _last_eval(run),
        "samples": _samples(run),
        "anomalies": _anomalies(run),
        "checkpoints": ckpts,
        # Beyond the issue's list, for the text report and scripts:
        "eta_periodic_seconds": _num(hooks_left_s) if eta is not None and not finished else None,
        "seconds_since_update": _num(since_update),
        "checkpoints_saving": saving,
        "notes": notes,
    }


# --------------------------------------------------------------------------- text

def _int(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _tokens(n: int | None, unit_of: int | None) -> str:
    if n is None:
        return "?"
    scale = unit_of if unit_of is not None else n
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if scale >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{n:,}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m = round(seconds / 60)
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def _f(x: float | None, spec: str) -> str:
    if x is None:
        return "n/a"
    return format(x, spec)


def _clip(text: str | None, width: int = 36) -> str:
    """A quoted one-line excerpt: newlines show as \\n, long text ends in an ellipsis."""
    if text is None:
        return "-"
    return json.dumps(text[: width - 1] + "…" if len(text) > width else text, ensure_ascii=False)


def _steps_list(steps: list[int], keep: int = 8) -> str:
    if len(steps) > keep:
        head, tail = ", ".join(map(str, steps[:2])), ", ".join(map(str, steps[-(keep - 3):]))
        return f"{head}, ..., {tail} ({len(steps)})"
    return ", ".join(map(str, steps))


def format_text(st: dict[str, Any]) -> str:
    """The human report of ``build_status``'s dict."""
    lines = [f"Training Status: {st['run_id']}   [{st['state']}]"]
    step, total = st["step"], st["total_steps"]
    if st["state"] == "stale":
        lines.append(f"  no new event for {format_duration(st['seconds_since_update'])}: "
                     "is the trainer still running?")
    if step is None:
        lines.append(f"Progress: no training step logged yet (0 / {_int(total)} steps)")
    elif total is None:
        lines.append(f"Progress: {_int(step)} steps (total unknown)")
    else:
        lines.append(f"Progress: {_int(step)} / {_int(total)} steps ({100 * st['progress']:.1f}%)")
    if st["tokens_seen"] is not None or st["total_tokens"] is not None:
        unit = st["total_tokens"]
        lines.append(f"Tokens:   {_tokens(st['tokens_seen'], unit)} / {_tokens(st['total_tokens'], unit)}")
    if step is not None:
        lines.append(f"Current metrics (step {_int(step)}):")
        lines.append(f"  Loss {_f(st['loss'], '.4f')}   LR {_f(st['lr'], '.4g')}   WD {_f(st['wd'], '.4g')}"
                     f"   Grad norm {_f(st['grad_norm'], '.4f')}")
        ms = st["step_time_ms"]
        lines.append(f"  Throughput {_f(st['tokens_per_sec'], ',.0f')} tokens/s   "
                     f"Step time {_f(ms, '.0f' if ms is not None and ms >= 10 else '.1f')} ms")
    if st["stage"] is not None:
        name = st["stage_name"] or "unknown stage"
        where = ""
        if st["stage_switch"] is not None:
            verb = "switch after" if st["stage"] == 1 else "switched after"
            where = f", {verb} step {_int(st['stage_switch'])}"
        lines.append(f"Stage: {st['stage']} ({name}){where}")
    eta = st["eta_seconds"]
    if st["state"] == "finished":
        lines.append("ETA: done")
    elif eta is not None:
        extra = " of work left, if it resumes" if st["state"] == "stale" else ""
        if st.get("eta_periodic_seconds"):
            extra += f" (incl. {format_duration(st['eta_periodic_seconds'])} of eval/samples/checkpoints)"
        lines.append(f"ETA: {format_duration(eta)}{extra}")
    else:
        lines.append("ETA: unknown (no step time logged yet)")
    ev = st["last_eval"]
    if ev is None:
        lines.append("Last eval: none yet")
    else:
        lines.append(f"Last eval (step {_int(ev['step'])}): eval loss {_f(ev['eval_loss'], '.4f')}, "
                     f"train loss {_f(ev['train_loss'], '.4f')}, gap {_f(ev['gap'], '.4f')}")
    sm = st["samples"]
    if sm is None:
        lines.append("Recent samples: none yet")
    else:
        lines.append(f"Recent samples (step {_int(sm['step'])}):")
        for item in sm["items"]:
            modes = [k for k in item if k != "prompt" and (item[k] is not None or k in SAMPLE_MODES)]
            shown = " | ".join(f"{m}: {_clip(item[m])}" for m in modes)
            prompt = _clip(item["prompt"], 40) if item["prompt"] is not None else "(prompt ?)"
            lines.append(f"  {prompt} -> {shown}")
    an = st["anomalies"]
    anomalies = f"Anomalies: {an['count']}"
    if an["last"] is not None:
        anomalies += f" (last: {an['last']['event']} at step {_int(an['last']['step'])})"
    ckpt = _steps_list(st["checkpoints"]) if st["checkpoints"] else "none yet"
    if st.get("checkpoints_saving"):
        ckpt += f" (saving {', '.join(map(str, st['checkpoints_saving']))})"
    lines.append(f"{anomalies}    Checkpoints: {ckpt}")
    lines += [f"Note: {n}" for n in st.get("notes") or []]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot

def smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing) over ``span`` points;
    non-finite values are skipped (they keep the previous average)."""
    alpha = 2.0 / (span + 1)
    out = np.empty(len(values))
    avg = weight = 0.0
    for i, v in enumerate(values.tolist()):
        if math.isfinite(v):
            avg = (1 - alpha) * avg + alpha * v
            weight = (1 - alpha) * weight + alpha
        out[i] = avg / weight if weight else math.nan
    return out


def plot_run(run: Run, st: dict[str, Any], path: str | Path) -> None:
    """Writes a PNG: train loss (raw faint, smoothed) and eval loss above; learning rate and weight
    decay (second y axis) below; the stage switch marked on both."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'bitnet-jax[plot]' (or pip install matplotlib)"
        ) from None
    log = run.log
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[2, 1])
    loss = log.scalars("train/loss")
    if loss is not None and len(loss):
        span = int(min(max(len(loss) // 50, 5), 500)) if len(loss) >= 10 else 1
        ax_loss.plot(loss.steps, loss.values, color="tab:blue", alpha=0.25, linewidth=0.6, label="train loss")
        if span > 1:
            ax_loss.plot(loss.steps, smooth(loss.values, span), color="tab:blue", linewidth=1.6,
                         label=f"train loss (EMA, {span} steps)")
    ev = log.scalars("eval/loss")
    if ev is not None and len(ev):
        ax_loss.plot(ev.steps, ev.values, "o-", color="tab:red", markersize=3.5, linewidth=1.2, label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    if loss is not None and len(loss) >= 100:
        # The first steps' loss (~ln vocab) would flatten everything after; clip it off the top.
        tail = loss.values[len(loss) // 50:]
        tail = tail[np.isfinite(tail)]
        if len(tail):
            highs = [float(np.percentile(tail, 99.5))]
            lows = [float(tail.min())]
            if ev is not None and len(ev) and np.isfinite(ev.values).any():
                highs.append(float(np.nanmax(ev.values[len(ev) // 50:])))
                lows.append(float(np.nanmin(ev.values)))
            lo, hi = min(lows), max(highs)
            pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
            ax_loss.set_ylim(lo - pad, hi + pad)
    lr, wd = log.scalars("train/lr"), log.scalars("train/wd")
    handles = []
    if lr is not None and len(lr):
        handles += ax_lr.plot(lr.steps, lr.values, color="tab:green", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(alpha=0.3)
    ax_wd = ax_lr.twinx()
    if wd is not None and len(wd):
        handles += ax_wd.plot(wd.steps, wd.values, color="tab:purple", linestyle="--", label="weight decay")
    ax_wd.set_ylabel("weight decay")
    switch = st.get("stage_switch")
    if switch is not None:
        for ax in (ax_loss, ax_lr):
            ax.axvline(switch, color="gray", linestyle=":", linewidth=1.2)
        ax_loss.annotate(f"stage switch ({switch:,})", xy=(switch, 0), xycoords=("data", "axes fraction"),
                         xytext=(4, 4), textcoords="offset points", color="gray", fontsize=8,
                         bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(loc="best", fontsize=8)
    if handles:
        ax_lr.legend(handles=handles, loc="best", fontsize=8)
    if st.get("total_steps"):  # the whole run on the x axis: how far along it is shows at a glance
        ax_lr.set_xlim(-0.01 * st["total_steps"], 1.01 * st["total_steps"])
    ax_lr.set_xlabel("step")
    title = f"{st['run_id']}  [{st['state']}]"
    if st["step"] is not None:
        title += f"  step {st['step']:,}" + (f" / {st['total_steps']:,}" if st["total_steps"] else "")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI

def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="status.py",
        description="Summarise a training run from its files (never talks to the trainer).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, runs/<run_id>/")
    p.add_argument("--json", action="store_true", help="print the report as JSON (keys: see README)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw loss, eval loss, LR and WD to this PNG (matplotlib)")
    p.add_argument("--watch", metavar="SECONDS", type=_positive_float,
                   help="refresh every SECONDS until the run finishes (reads only new bytes)")
    p.add_argument("--stale-after", metavar="SECONDS", type=_positive_float,
                   help=f"call the run stale after this long without a new event (default: "
                        f"{STALE_STEP_TIMES} median step times plus the longest eval/sample hook, at least "
                        f"{MIN_STALE_S:.0f} s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = Run(args.run_dir)
    except RunDirError as e:
        print(f"status.py: error: {e}", file=sys.stderr)
        return 2
    clear = args.watch and not args.json and sys.stdout.isatty()
    rc = 0
    plot = args.plot
    try:
        while True:
            try:
                run.refresh()
            except RunDirError as e:
                print(f"status.py: error: {e}", file=sys.stderr)
                return 2
            st = build_status(run, stale_after=args.stale_after)
            if args.json:
                out = json.dumps(st, indent=None if args.watch else 2, allow_nan=False)
            else:
                out = format_text(st)
            if clear:
                out = "\033[H\033[2J" + out
            print(out, flush=True)
            if plot:
                try:
                    plot_run(run, st, plot)
                except PlotUnavailable as e:
                    print(f"status.py: error: {e}", file=sys.stderr)
                    rc, plot = 1, None
            if not args.watch or st["state"] == "finished":
                return rc
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return rc
    except BrokenPipeError:  # e.g. status.py RUN | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return rc


if __name__ == "__main__":
    sys.exit(main())
