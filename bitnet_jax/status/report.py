"""What the numbers of a status report are: ``build_status(run)``, the dict ``--json`` prints.

Everything comes from the run's files (``Run``): the newest logged step, tokens from config.yaml,
medians of the recent step times, an ETA that includes the periodic work still to come, the newest
eval and samples, anomalies, checkpoints, and the run's state (see ``_state``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from bitnet_jax.eventfile import Series
from bitnet_jax.sample_text import parse_sample_markdown, parse_sample_tag
from bitnet_jax.status.run import Run

STAGE_NAMES = {1: "high LR + weight decay", 2: "cooldown, no weight decay"}
RECENT_STEPS = 100  # the "recent window" for median step time and throughput
STALE_STEP_TIMES = 10  # no new event for this many median step times (and not finished): stale
MIN_STALE_S = 60.0  # ... but never sooner: event writers buffer, a live run can be quiet this long
# Before the first step (compiling, loading data) the run may be quiet this long; a run folder with
# no step, no checkpoint and nothing written for longer is "not started" (its start failed).
START_WINDOW_S = 600.0
ENDED_STATES = ("finished", "halted", "stopped", "failed", "killed")  # the trainer has exited
HOOK_INTERVAL_KEYS = {  # time/<hook>_ms -> the config key of its interval, when it ran too few times
    "eval": "eval.every",
    "samples": "log.samples_every",
    "metrics": "log.metrics_every",
    "checkpoint": "checkpoint.every",
}
SAMPLE_MODES = ("greedy", "typical", "stress")


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
            value = run.config.get(HOOK_INTERVAL_KEYS[hook])
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
    logged_prompts: dict[int, str] = {}
    for tag, events in run.log.texts().items():
        parsed = parse_sample_tag(tag)
        if parsed is None:
            continue
        index, mode = parsed
        for ev in events:
            body = parse_sample_markdown(ev.text)
            if body is not None:  # prompt and text as verbatim blocks; older runs logged the bare text
                logged_prompts[index], text = body
            else:
                text = ev.text
            by_step.setdefault(ev.step, {}).setdefault(index, {})[mode] = text
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
    prompts = list(run.config.get("log.prompts") or []) if run.config is not None else []
    items = []
    for index in sorted(by_step[step]):
        modes = by_step[step][index]
        prompt = prompts[index] if index < len(prompts) else logged_prompts.get(index)
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


def _damage_notes(run: Run) -> list[str]:
    """One note per event file with damaged bytes that the reader skipped."""
    by_file: dict[Any, list[str]] = {}
    for path, offset, size in run.log.damaged:
        by_file.setdefault(path, []).append(f"{offset:,} ({size:,} bytes)")
    notes = []
    for path, spots in by_file.items():
        where = path.relative_to(run.path) if path.is_relative_to(run.path) else path
        notes.append(f"{where} is damaged: read on past the unreadable bytes at offset {', '.join(spots)}; "
                     "the events in them are lost")
    return notes


def _state(finished: bool, end, step: int | None, has_checkpoints: bool, since_update: float | None,
           stale_after: float, trainer: dict | None = None) -> str:
    """The run's state, first rule that applies:

    - the trainer's end record (end.json, not older than the newest event): its state;
    - the last logged step is train.steps: ``finished``;
    - the lock names a trainer on this host whose process is gone: ``killed`` (kill -9, the
      out-of-memory killer, a reboot: it ended without a word); one whose process is alive:
      ``running``, however long it has been quiet (compiling, a long eval);
    - no step logged, no checkpoint, and nothing written for ``stale_after`` (START_WINDOW_S unless
      given): ``not started`` (a start that failed, or was stopped, before its first step);
    - nothing written for ``stale_after``: ``stale``;
    - else ``running``.
    """
    if end is not None:
        return end.state
    if finished:
        return "finished"
    if trainer is not None and trainer["alive"] is not None:
        return "running" if trainer["alive"] else "killed"
    quiet = since_update is not None and since_update > stale_after
    if quiet and step is None and not has_checkpoints:
        return "not started"
    return "stale" if quiet else "running"


def build_status(run: Run, now: float | None = None, stale_after: float | None = None) -> dict[str, Any]:
    """The report as a dict: the ``--json`` output (keys documented in the README)."""
    now = time.time() if now is None else now
    cfg, log = run.config, run.log
    notes = list(run.config_notes)

    loss = log.scalars("train/loss")
    if loss is not None and len(loss):
        step = loss.last_step
    else:  # no loss logged (yet): the newest step of any train/ scalar
        steps = [s.last_step for t in log.tags() if t.startswith("train/")
                 for s in [log.scalars(t)] if s is not None and len(s)]
        step = max(steps) if steps else None
    total = cfg.get("train.steps") if cfg else None
    per_step = cfg.get("tokens_per_step") if cfg else None

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
    switch = cfg.get("stage_switch") if cfg else None
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
    if step is None:  # nothing trained yet: any file the start wrote is a sign of life
        times.append(run.newest_file_time())
    times = [t for t in times if t is not None]
    last_update = max(times) if times else None
    since_update = max(0.0, now - last_update) if last_update is not None else None
    if stale_after is None:
        stale_after = (max(MIN_STALE_S, STALE_STEP_TIMES * step_time_ms / 1000 + longest_hook_s)
                       if step_time_ms else START_WINDOW_S)

    end, end_note = run.end_record()
    if end_note:
        notes.append(end_note)
    if end is not None and not end.is_current(log.last_wall_time):
        end = None  # written by an earlier process: the run was started again since
    ckpts, saving = run.checkpoints()
    trainer = run.trainer() if end is None else None
    state = _state(finished, end, step, bool(ckpts), since_update, stale_after, trainer)
    # With no trainer alive on the run (it ended, or has written nothing for a while), a tmp folder is a
    # save cut off half-way (kill -9, a full disk), not one in progress: the next resume removes it.
    abandoned = saving if end is not None or state in ("finished", "stale", "not started", "killed") else []
    saving = [s for s in saving if s not in abandoned]
    if state == "finished":
        eta = 0.0
    elif step is not None and total is not None and step_time_ms is not None:
        eta = (total - step) * step_time_ms / 1000 + hooks_left_s
    else:
        eta = None
    notes += _damage_notes(run)

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
        # Beyond the list, for the text report and scripts:
        "eta_periodic_seconds": _num(hooks_left_s) if eta is not None and state != "finished" else None,
        "seconds_since_update": _num(since_update),
        "checkpoints_saving": saving,
        "checkpoints_abandoned": abandoned,
        "end": None if end is None else {"state": end.state, "step": end.step, "reason": end.reason,
                                         "exit_code": end.exit_code, "time": end.time},
        "trainer": None if trainer is None else {k: trainer.get(k) for k in ("pid", "host", "alive")},
        "notes": notes,
    }
