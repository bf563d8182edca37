"""The human report: ``format_text(build_status(run))``."""

from __future__ import annotations

import json
from typing import Any

from bitnet_jax.status.report import SAMPLE_MODES
from bitnet_jax.units import format_count, format_duration


def _int(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


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


def _state_line(st: dict[str, Any]) -> str | None:
    """The line under the title that says why the run is not simply running, if it is not."""
    state, end = st["state"], st.get("end")
    if state == "killed":
        who = st["trainer"]
        return (f"  its trainer (process {who['pid']} on {who['host']}) is gone without a word (kill -9, out of "
                "memory, a reboot?); resume it to go on")
    if state == "stale":
        return f"  no new event for {format_duration(st['seconds_since_update'])}: is the trainer still running?"
    if state == "not started":
        return (f"  no training step and no checkpoint, and nothing written for "
                f"{format_duration(st['seconds_since_update'])}: the start failed or was stopped before "
                "step 1 (see the trainer's output)")
    if end is not None and (state != "finished" or st["step"] != st["total_steps"]):
        step = end["step"] if end["step"] is not None else st["step"]
        where = f"at step {_int(step)}" if step is not None else "before step 1"
        reason = f" ({end['reason']})" if end["reason"] else ""
        return f"  {state} {where}{reason}, exit code {end['exit_code']}"
    return None


def format_text(st: dict[str, Any]) -> str:
    """The human report of ``build_status``'s dict."""
    lines = [f"Training Status: {st['run_id']}   [{st['state']}]"]
    step, total = st["step"], st["total_steps"]
    state_line = _state_line(st)
    if state_line:
        lines.append(state_line)
    if step is None:
        lines.append(f"Progress: no training step logged yet (0 / {_int(total)} steps)")
    elif total is None:
        lines.append(f"Progress: {_int(step)} steps (total unknown)")
    else:
        lines.append(f"Progress: {_int(step)} / {_int(total)} steps ({100 * st['progress']:.1f}%)")
    if st["tokens_seen"] is not None or st["total_tokens"] is not None:
        unit = st["total_tokens"]
        lines.append(f"Tokens:   {format_count(st['tokens_seen'], unit, trim=False)} / "
                     f"{format_count(st['total_tokens'], unit, trim=False)}")
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
        extra = "" if st["state"] == "running" else " of work left, if it resumes"
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
    lines += [f"Checkpoint {s}: abandoned (an unfinished save; the next resume removes it)"
              for s in st.get("checkpoints_abandoned") or []]
    lines += [f"Note: {n}" for n in st.get("notes") or []]
    return "\n".join(lines)
