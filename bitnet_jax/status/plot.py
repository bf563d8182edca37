"""``status.py RUN_DIR --plot FILE.png``: the run's curves, drawn with matplotlib (an optional extra)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_jax.status.run import Run


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


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
