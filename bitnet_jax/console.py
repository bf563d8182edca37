"""What a run says while it trains, in any log: a start block, a line at the session's first step and
every ``log.print_every`` steps (and at least every ``MAX_SILENCE_S``), evals, checkpoints and warnings as they happen, and the
summary at the end. Lines go to stdout, flushed, so ``> log``, nohup and SLURM logs fill as the run
goes; in a terminal a tqdm bar on stderr counts the steps, with the same lines printed above it.
Only process 0 talks.
"""

from __future__ import annotations

import collections
import math
import sys
import time
from pathlib import Path

import numpy as np

from bitnet_jax.hooks import Hook, StepInfo
from bitnet_jax.units import format_duration

MAX_SILENCE_S = 60.0  # a progress line at least this often, whatever log.print_every says


def command(program: str, *args: object) -> str:
    """A command line the user can paste as it is: ``python`` (or a console script next to it, e.g.
    ``tensorboard``) as the interpreter running this process, relative to the working directory when
    it lies inside it (``.venv/bin/python`` after ``make train``)."""
    exe = Path(sys.executable)
    path = exe if program == "python" else exe.with_name(program)
    if program != "python" and not path.exists():
        head = program
    else:
        try:
            head = str(path.relative_to(Path.cwd()))
        except ValueError:
            head = program
    return " ".join([head, *map(str, args)])


class Console:
    """The run's voice (see the module docstring). ``enabled`` False (processes other than 0) makes
    every method a no-op; ``bar`` shows the tqdm bar (only when stderr is a terminal); ``clock``: seconds
    of a monotonic clock (what ``MAX_SILENCE_S`` is measured on)."""

    def __init__(self, *, total_steps: int, start_step: int, print_every: int, enabled: bool = True,
                 bar: bool = False, clock=time.monotonic):
        self.enabled = enabled
        self.total_steps, self.start_step, self.print_every = total_steps, start_step, print_every
        self._step_times = collections.deque(maxlen=100)  # this session's steps only
        self._clock = clock
        self._last_line = clock()
        self.first: tuple[int, float] | None = None  # (step, loss) of this session's first finite loss
        self.last: dict[str, float] = {}
        self.skipped = 0  # updates dropped as non-finite in this session
        self._bar = None
        if enabled and bar:
            from tqdm import tqdm

            # ``initial``: a resumed run's bar starts at its restored step, and its rate counts only
            # this session's steps.
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    # ----------------------------------------------------------------- lines
    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(text, flush=True)

    def warn(self, text: str) -> None:
        self.say(f"warning: {text}")

    def block(self, title: str, rows: list[tuple[str, object]]) -> None:
        width = max(len(k) for k, _ in rows) + 1
        self.say("\n".join([title, *(f"  {k + ':':<{width}} {v}" for k, v in rows)]))

    # ----------------------------------------------------------------- the per-step hook
    def hook(self) -> Hook:
        return Hook("console", self.on_step)

    def on_step(self, info: StepInfo) -> None:
        m = info.metrics
        self.last = {"step": info.step, **m}
        if m.get("skipped"):
            self.skipped += 1
        elif self.first is None and math.isfinite(m["loss"]):
            self.first = (info.step, m["loss"])
        first = info.step == self.start_step + 1  # its time is mostly compilation: not a step time
        if not first:
            self._step_times.append(m["step_time_ms"])
        if self._bar is not None:
            self._bar.update(info.step - self._bar.n)
            self._bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_sec']:,.0f}",
                                  stage=int(m["stage"]), refresh=False)
        now = self._clock()
        due = self.print_every > 0 and info.step % self.print_every == 0
        if due or first or now - self._last_line >= MAX_SILENCE_S or info.step == self.total_steps:
            self._last_line = now  # the first line says at once that the step compiled and runs
            self.say(self.progress_line(info.step, m, first=first))

    def progress_line(self, step: int, m: dict, first: bool = False) -> str:
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3e}"]
        if first:
            return " | ".join(parts + [f"first step {format_duration(m['step_time_ms'] / 1e3)} (compiling included)"])
        parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
        if "mfu" in m:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        if self._step_times:
            left_s = (self.total_steps - step) * float(np.median(self._step_times)) / 1e3
            parts.append(f"eta {format_duration(left_s)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
