"""TensorBoard scalars with a one-step-behind host fetch, throughput and MFU.

The train loop dispatches step s, then hands step s's device metrics to ``StepMetrics.push``, which
fetches step s-1's values for the hooks: by then they are ready (or nearly), so logging never stalls
the accelerator. The wall time between two consecutive fetches is the device's step time once the host
runs ahead of the device.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bitnet_jax.hooks import Hook, StepInfo
from bitnet_jax.tb_layout import CUSTOM_SCALARS

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (SXM parts; the first matching
# name wins, so the PCIe and NVL H100s, slower parts, are listed before the SXM one).
PEAK_FLOPS_BF16 = {
    "H100 PCIE": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of a known GPU kind, else None (MFU is then omitted)."""
    kind = (device or jax.devices()[0]).device_kind.upper()
    for name, peak in PEAK_FLOPS_BF16.items():
        if name in kind:
            return peak
    return None


class TensorBoard:
    """A thin tensorboardX writer; tags are DESIGN's (``train/loss``, ``eval/loss``, ...).

    On opening it writes the Custom Scalars layout (``tb_layout``): each process start writes one
    into its own event file, and TensorBoard shows the newest."""

    def __init__(self, log_dir: Path, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            # The pid in the name keeps two writers opened in the same second (a restart) apart.
            self._writer = SummaryWriter(str(log_dir), flush_secs=10, max_queue=1000,
                                         filename_suffix=f".{os.getpid()}")
            self._writer.add_custom_scalars(CUSTOM_SCALARS)
            # A non-finite loss is logged as it is and reported once, by the run's own warning line.
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def text(self, step: int, tag: str, text: str) -> None:
        """Text under exactly ``tag``: ``add_text`` would append ``/text_summary`` to it. Stored as
        a scalar string, which TensorBoard renders as one Markdown document (not a one-cell table)."""
        if self._writer is not None:
            from tensorboardX.summary import text as text_summary

            summary = text_summary(tag, text)
            summary.value[0].tag = tag
            summary.value[0].tensor.tensor_shape.Clear()
            self._writer.file_writer.add_summary(summary, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class StepMetrics:
    """Per-step host metrics, fetched one step behind, with throughput and MFU from the host clock;
    keeps the recent history that the eval gap and the summary need (a checkpointed resumable)."""

    def __init__(self, *, tokens_per_step: int, flops_per_token: float, peak_flops_total: float | None,
                 window: int = 1000):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self._pending: tuple[int, Any] | None = None
        self._last_fetch: float | None = None
        self.losses = collections.deque(maxlen=window)  # (step, loss) of recent steps
        self.step_times_ms = collections.deque(maxlen=100)
        self.last: dict[str, float] = {}  # the newest fetched step's host metrics

    def start_clock(self) -> None:
        """Starts the step timer (call right before dispatching the first step)."""
        self._last_fetch = time.perf_counter()

    def push(self, step: int, device_metrics: dict[str, jax.Array]) -> list[tuple[int, dict[str, float]]]:
        """Takes step ``step``'s device metrics and returns ``[(step - 1, host metrics)]``: the previous
        step's values, ready (or nearly) by now, so the fetch never stalls the accelerator."""
        previous, self._pending = self._pending, (step, device_metrics)
        return [] if previous is None else [self._fetch(*previous)]

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """Fetches the pending step now (at sync points: eval, checkpoint, the end)."""
        previous, self._pending = self._pending, None
        return [] if previous is None else [self._fetch(*previous)]

    @contextlib.contextmanager
    def paused(self):
        """Leaves the time spent inside (periodic hooks) out of the next step's time."""
        mark = time.perf_counter()
        try:
            yield
        finally:
            if self._last_fetch is not None:
                self._last_fetch += time.perf_counter() - mark

    def _fetch(self, step: int, device_metrics: dict[str, jax.Array]) -> tuple[int, dict[str, float]]:
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        dt = now - (self._last_fetch if self._last_fetch is not None else now)
        self._last_fetch = now
        host["step_time_ms"] = dt * 1e3
        host["tokens_per_sec"] = self.tokens_per_step / dt if dt > 0 else 0.0
        host["tokens_seen"] = float(step * self.tokens_per_step)
        if self.peak_flops_total:
            host["mfu"] = host["tokens_per_sec"] * self.flops_per_token / self.peak_flops_total
        if math.isfinite(host["loss"]):
            self.losses.append((step, host["loss"]))
        self.step_times_ms.append(dt * 1e3)
        self.last = {"step": step, **host}
        return step, host

    def state_dict(self) -> dict:
        """The recent train losses, saved with each checkpoint: after a resume the first eval's
        ``eval/train_eval_gap`` still averages every step since the previous eval."""
        return {"losses": [[s, loss] for s, loss in self.losses]}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend((int(s), float(loss)) for s, loss in state.get("losses", []))

    def mean_loss_since(self, step: int) -> float | None:
        """Mean train loss over steps after ``step`` (the window of an eval)."""
        vals = [loss for s, loss in self.losses if s > step]
        return float(np.mean(vals)) if vals else None

    def median_step_ms(self) -> float | None:
        return float(np.median(self.step_times_ms)) if self.step_times_ms else None


# Host metric name -> TensorBoard tag (DESIGN's per-step tags).
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/lr", "wd": "train/wd", "grad_norm": "train/grad_norm",
              "step_time_ms": "train/step_time_ms", "tokens_per_sec": "train/tokens_per_sec",
              "tokens_seen": "train/tokens_seen", "stage": "train/stage", "mfu": "train/mfu"}


def train_scalars_hook(tb: TensorBoard) -> Hook:
    """Writes every step's ``train/*`` scalars (``train/skipped_updates`` only when an update was dropped)."""

    def write(info: StepInfo) -> None:
        values = {tag: info.metrics[name] for name, tag in TRAIN_TAGS.items() if name in info.metrics}
        if info.metrics.get("skipped"):
            values["train/skipped_updates"] = info.metrics["skipped"]
        tb.scalars(info.step, values)

    return Hook("train_scalars", write)
