"""Anomaly detection on the host-side metrics, with a dump folder per event.

Events (the ``<event>`` of the TensorBoard text tag ``anomaly/<event>`` and of the dump folder
``anomalies/<step>_<event>/``):

- ``nonfinite``: the loss or the gradient norm was NaN/inf. The train step already dropped the
  update; with ``train.on_nan: halt`` the run also stops (``halt_reason`` is set, naming the first
  non-finite step), and with ``skip`` it stops once more than ``train.max_skipped`` updates were
  skipped in all or more than ``train.max_skipped_consecutive`` in a row.
- ``loss_spike`` / ``grad_norm_spike``: the value is both far above the recent run by robust
  statistics (``log(value)`` more than ``log.spike_zscore`` robust standard deviations, 1.4826 x the
  median absolute deviation, above the median of the previous ``log.spike_window`` accepted values)
  and a large multiple of that median (``GRAD_NORM_MIN_RATIO`` 3x, ``LOSS_MIN_RATIO`` 1.5x). Not
  judged during the first ``optim.warmup_steps`` steps (their values still fill the history). See
  ``RollingSpike``.
- ``entropy_collapse`` / ``repetition``: a ``typical`` sample whose mean next-token entropy is below
  ``log.entropy_floor`` nats, or whose share of repeated 4-grams is above ``log.repetition_max``
  (greedy output of a young model loops by nature, so only the sampled mode is judged).

Each event kind writes at most ``log.anomaly_dumps_max`` dump folders (later ones go to TensorBoard
only), so no run of spikes can leave a later non-finite step without its dump.

Everything runs on values the trainer already has on the host (``StepMetrics`` fetched them one
step behind): the detector never touches the device. To dump the batch of a step that is judged one
step later it keeps the last two host batches (numpy, this process's rows).
"""

from __future__ import annotations

import collections
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bitnet_jax.config import Config, LogConfig

EVENTS = ("nonfinite", "loss_spike", "grad_norm_spike", "entropy_collapse", "repetition")
CHECKED_SAMPLE_MODE = "typical"
MIN_SAMPLE_TOKENS = 16  # shorter samples say too little about repetition
MIN_ENTROPY_TOKENS = 8  # ... or about entropy (a sample that hits EOS at once has no entropy at all)


# A spike needs both a robust z-score above log.spike_zscore and a value this many times the rolling
# median. The z-score alone fires on healthy runs: gradient norms are heavy-tailed (steps at ~2x the
# median are routine), and on a quiet stretch the spread is so small that any bump is "6 sigma".
# - grad norm: 3x. Healthy bumps stay near 2x; the blow-ups that precede divergence (and that
#   clipping hides from the loss) are 10x and more.
# - loss: 1.5x. The loss (nats) moves far less than the grad norm: batch-to-batch noise is a few
#   percent (~10% on a small batch with an odd document), so 1.5x the median (e.g. 3.0 -> 4.5) means
#   the model lost much of what it learned, which is what a loss spike is.
GRAD_NORM_MIN_RATIO = 3.0
LOSS_MIN_RATIO = 1.5
MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution is 0.6745 sigma
MIN_LOG_SIGMA = 1e-3  # floor of the robust spread of log(value): a flat history is not infinitely tight


class RollingSpike:
    """Upward spikes of a positive series against the previous ``window`` accepted values, by robust
    statistics of ``log(value)``: median and MAD, so heavy tails and earlier spikes barely move them.

    A value is a spike when ``z = (log x - median) / (1.4826 MAD)`` exceeds ``zscore`` AND
    ``x >= min_ratio * exp(median)``. Values judged spikes are not added to the window (a spike must
    not raise the bar for the next one); they are held aside instead, and if ``min_history`` of them
    come in a row the level has shifted for good: they become the window and judging goes on from the
    new level (otherwise every later step would be an event). A value that is not a spike is added
    and ends such a run.
    """

    def __init__(self, window: int, zscore: float, min_ratio: float):
        self.values: collections.deque[float] = collections.deque(maxlen=window)
        self.min_history = min(window, max(5, window // 5))
        self.zscore = zscore
        self.min_ratio = min_ratio
        self.pending: list[float] = []  # consecutive spikes, not in the window

    def score(self, x: float) -> tuple[float, float, float] | None:
        """``(z, ratio, median)`` of ``x`` against the window (None until ``min_history`` values):
        the robust z-score of ``log x``, ``x / median`` and the window's median."""
        if len(self.values) < self.min_history:
            return None
        logs = np.log(np.maximum(np.asarray(self.values, np.float64), 1e-30))
        centre = float(np.median(logs))
        sigma = max(MAD_TO_SIGMA * float(np.median(np.abs(logs - centre))), MIN_LOG_SIGMA)
        z = (math.log(max(x, 1e-30)) - centre) / sigma
        median = math.exp(centre)
        return z, x / median, median

    def is_spike(self, score: tuple[float, float, float] | None) -> bool:
        return score is not None and score[0] > self.zscore and score[1] >= self.min_ratio

    def judge(self, x: float) -> tuple[float, float, float] | None:
        """Scores ``x``, updates the window, and returns the score if ``x`` is a spike, else None."""
        score = self.score(x)
        if not self.is_spike(score):
            self.pending.clear()
            self.add(x)
            return None
        self.pending.append(float(x))
        if len(self.pending) >= self.min_history:  # a lasting new level, not a spike: start over from it
            self.values.clear()
            self.values.extend(self.pending)
            self.pending.clear()
        return score

    def add(self, x: float) -> None:
        self.values.append(float(x))


def poison_if_due(rows: np.ndarray, step: int, poison_step: int, vocab_size: int) -> np.ndarray:
    """Debug switch ``train.debug_poison_step``: at that step, one token id of the batch is set out
    of the vocabulary, so the embedding lookup yields NaN (a corrupt-data stand-in that exercises
    the whole NaN path). Returns ``rows`` untouched at every other step."""
    if poison_step <= 0 or step != poison_step:
        return rows
    rows = np.array(rows, copy=True)
    rows[0, 0] = vocab_size
    return rows


def _json_safe(metrics: dict[str, float]) -> dict[str, Any]:
    """Non-finite floats as strings ("nan", "inf"): strict JSON has no NaN."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


def decode_rows(tokenizer, rows: np.ndarray) -> list[str]:
    """Each row as text; ids outside the vocabulary (a poisoned or corrupt batch) show as <bad id N>."""
    out = []
    for row in np.asarray(rows):
        parts, run = [], []
        for t in row.tolist():
            if 0 <= t < tokenizer.vocab_size:
                run.append(t)
                continue
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(f"<bad id {t}>")
        if run:
            parts.append(tokenizer.decode(run))
        out.append("".join(parts))
    return out


class AnomalyDetector:
    """Judges every step's host metrics (a ``StepMetrics`` listener) and the periodic samples.

    ``write`` is False on processes other than 0: they judge (so all processes halt together) but
    leave TensorBoard and the dumps to process 0. ``state_dict`` / ``load_state_dict`` carry the
    spike windows, the event count and the last good step across a resume.
    """

    def __init__(self, cfg: Config, run_dir: Path, tb, tokenizer, *, write: bool = True,
                 warn: Callable[[str], None] | None = None):
        log: LogConfig = cfg.log
        self.log = log
        self.on_nan = cfg.train.on_nan
        self.dir = Path(run_dir) / "anomalies"
        self.tb = tb
        self.tokenizer = tokenizer
        self.write = write
        self.warn = warn  # the console: one warning line per event, naming its dump folder
        self.warmup_steps = cfg.optim.warmup_steps
        # train.on_nan=skip tolerates this many skipped updates (in all, and in a row), then halts:
        # a run that skips every update would otherwise finish "successfully" with nothing learned.
        self.max_skipped = cfg.train.max_skipped
        self.max_skipped_consecutive = cfg.train.max_skipped_consecutive
        self.skipped = 0  # updates skipped as non-finite over the whole run (carried across a resume)
        self.skipped_in_a_row = 0
        self.loss = RollingSpike(log.spike_window, log.spike_zscore, LOSS_MIN_RATIO)
        self.grad_norm = RollingSpike(log.spike_window, log.spike_zscore, GRAD_NORM_MIN_RATIO)
        self.count = 0
        # Dump folders written, per event kind: each kind has its own log.anomaly_dumps_max, so a run
        # of spikes cannot use up the dumps of a later non-finite step.
        self.dumps: dict[str, int] = {}
        self.last_good_step: int | None = None
        self.halt_reason: str | None = None
        self._batches: collections.deque[tuple[int, np.ndarray]] = collections.deque(maxlen=2)

    # ----------------------------------------------------------------- inputs
    def remember_batch(self, step: int, rows: np.ndarray) -> None:
        """Keeps the host rows of the batch that makes ``step`` (the last two are kept)."""
        self._batches.append((step, rows))

    def on_step_metrics(self, step: int, host: dict[str, float]) -> None:
        loss, grad_norm = host.get("loss", math.nan), host.get("grad_norm", math.nan)
        if host.get("skipped") or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            action = "the run halts (train.on_nan=halt)" if self.on_nan == "halt" else \
                "the update was skipped (train.on_nan=skip)"
            message = f"loss {loss}, grad_norm {grad_norm}: non-finite; {action}"
            self.report(step, "nonfinite", message, host)
            self.skipped += 1
            self.skipped_in_a_row += 1
            if self.halt_reason is None:  # the first cause is the one to name (later steps follow from it)
                self.halt_reason = self._halt_reason(step, message)
            return
        self.skipped_in_a_row = 0
        for event, series, value in (("loss_spike", self.loss, loss), ("grad_norm_spike", self.grad_norm, grad_norm)):
            if step <= self.warmup_steps:  # warm-up: the series is still settling; history only
                series.add(value)
                continue
            n = len(series.values)
            score = series.judge(value)
            if score is not None:
                z, ratio, median = score
                name = event.removesuffix("_spike")
                self.report(step, event, f"{name} {value:.4g} is {ratio:.1f}x the median {median:.4g} of the "
                            f"previous {n} steps ({z:.1f} robust standard deviations of log({name}) above it)",
                            host)
        self.last_good_step = step

    def _halt_reason(self, step: int, message: str) -> str | None:
        """Why the run halts after the non-finite ``step``, or None while it may go on."""
        if self.on_nan == "halt":
            return f"step {step}: {message}"
        counts = f"{self.skipped} updates skipped in all, {self.skipped_in_a_row} in a row up to step {step}"
        if self.skipped_in_a_row > self.max_skipped_consecutive:
            return f"train.max_skipped_consecutive={self.max_skipped_consecutive} exceeded: {counts}"
        if self.skipped > self.max_skipped:
            return f"train.max_skipped={self.max_skipped} exceeded: {counts}"
        return None

    def check_samples(self, step: int, samples: Sequence[dict[str, Any]]) -> None:
        """``samples``: records with prompt_index, prompt, mode, text, tokens, entropy, repetition."""
        judged = [s for s in samples if s["mode"] == CHECKED_SAMPLE_MODE]
        low = [s for s in judged
               if len(s["tokens"]) >= MIN_ENTROPY_TOKENS and s["entropy"] < self.log.entropy_floor]
        loops = [s for s in judged
                 if len(s["tokens"]) >= MIN_SAMPLE_TOKENS and s["repetition"] > self.log.repetition_max]
        if low:
            worst = min(s["entropy"] for s in low)
            self.report(step, "entropy_collapse",
                        f"{len(low)} of {len(judged)} {CHECKED_SAMPLE_MODE} samples have a mean next-token entropy "
                        f"below log.entropy_floor={self.log.entropy_floor} nats (lowest {worst:.3f})", samples=low)
        if loops:
            worst = max(s["repetition"] for s in loops)
            self.report(step, "repetition",
                        f"{len(loops)} of {len(judged)} {CHECKED_SAMPLE_MODE} samples repeat more than "
                        f"log.repetition_max={self.log.repetition_max} of their 4-grams (highest {worst:.2f})",
                        samples=loops)

    # ----------------------------------------------------------------- output
    def report(self, step: int, event: str, message: str, metrics: dict[str, float] | None = None,
               samples: Sequence[dict[str, Any]] | None = None) -> Path | None:
        """Records one event: TB text ``anomaly/<event>``, scalar ``anomaly/count``, and (up to
        ``log.anomaly_dumps_max`` of each event kind) a dump folder, whose path it returns."""
        self.count += 1
        if not self.write:
            return None
        dump = None
        if self.dumps.get(event, 0) < self.log.anomaly_dumps_max:
            dump = self._dump(step, event, message, metrics, samples)
            self.dumps[event] = self.dumps.get(event, 0) + 1
        where = (f" Dump: anomalies/{dump.name}/" if dump else
                 f" (no dump: log.anomaly_dumps_max={self.log.anomaly_dumps_max} {event} dumps reached)")
        last_good = "none yet" if self.last_good_step is None else f"step {self.last_good_step}"
        self.tb.text(step, f"anomaly/{event}", f"step {step}: {message}. Last good step: {last_good}.{where}")
        self.tb.scalars(step, {"anomaly/count": self.count})
        if self.warn is not None:
            self.warn(f"{event} at step {step}: {message}." + (f" Dump: {dump}" if dump else where))
        return dump

    def _dump(self, step, event, message, metrics, samples) -> Path:
        folder = self.dir / f"{step}_{event}"
        tmp = self.dir / f".{step}_{event}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # The batch that made this step if still held, else the newest one (for sample events).
        batch_step, rows = next(((s, r) for s, r in self._batches if s == step),
                                self._batches[-1] if self._batches else (None, None))
        info = {
            "step": step, "event": event, "message": message,
            "metrics": _json_safe(metrics or {}), "last_good_step": self.last_good_step,
            "batch_step": batch_step,
            "batch_note": ("this process's rows of the batch that made batch_step" if rows is not None
                           else "no batch held"),
        }
        if rows is not None:
            np.save(tmp / "batch_tokens.npy", np.asarray(rows))
            texts = decode_rows(self.tokenizer, rows)
            (tmp / "batch_text.txt").write_text(
                "".join(f"=== row {i} ===\n{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
        if samples:
            (tmp / "samples.json").write_text(json.dumps(list(samples), indent=2), encoding="utf-8")
        (tmp / "event.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # the same step judged again after a resume
        tmp.rename(folder)
        return folder

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_window": list(self.loss.values), "grad_norm_window": list(self.grad_norm.values),
            "loss_pending": list(self.loss.pending), "grad_norm_pending": list(self.grad_norm.pending),
            "count": self.count, "dumps": sum(self.dumps.values()), "dumps_by_event": dict(self.dumps),
            "last_good_step": self.last_good_step, "skipped": self.skipped,
            "skipped_in_a_row": self.skipped_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, series in (("loss", self.loss), ("grad_norm", self.grad_norm)):
            series.values.clear()
            series.values.extend(float(v) for v in state.get(f"{name}_window", []))
            series.pending = [float(v) for v in state.get(f"{name}_pending", [])]
        self.count = int(state.get("count", 0))
        if "dumps_by_event" in state:
            self.dumps = {str(k): int(v) for k, v in state["dumps_by_event"].items()}
        else:  # a checkpoint from before per-kind budgets: which kinds its total went to is unknown,
            # so it counts against every kind but nonfinite (whose dumps are the ones that must not be lost)
            legacy = int(state.get("dumps", 0))
            self.dumps = {event: legacy for event in EVENTS if event != "nonfinite" and legacy}
        self.skipped = int(state.get("skipped", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        last = state.get("last_good_step")
        self.last_good_step = None if last is None else int(last)
