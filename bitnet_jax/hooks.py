"""The train loop's one extension point: ``Hook(name, fn, every=N)``, where ``fn(info: StepInfo)``.

Every piece of periodic or per-step work is a hook: per-step scalars, the console, the anomaly check,
the background-save check, eval, BitNet metrics, samples, checkpoints. A hook that needs the train
state (``needs_state``) runs at its step with the device in sync; every other hook runs as soon as
its step's metrics reach the host, which is one step behind the device (see ``loop.run_loop``), so
it never makes the accelerator wait.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One completed step as a hook sees it.

    ``metrics``: host floats of the step: ``loss``, ``lr``, ``wd``, ``grad_norm``, ``stage``,
    ``skipped`` (from the device) and ``step_time_ms``, ``tokens_per_sec``, ``tokens_seen``,
    ``mfu`` where the peak is known (from the host clock); empty when no step ran in this session.
    ``state``: the TrainState right after ``step``, for hooks with ``needs_state``; None for the
    others (they run one step behind, when the state has already moved on).
    ``final``: the session's last step (the end of the run, ``--stop-at`` or a stop request).
    """

    step: int
    metrics: Mapping[str, float]
    state: Any = None
    final: bool = False


@dataclasses.dataclass
class Hook:
    """``fn(info)`` after every ``every``-th step (0: never periodically), at the listed ``steps``,
    and, with ``at_exit``, once more when the session ends (``info.final``). ``timed`` hooks record
    their duration as the scalar ``time/<name>_ms`` (status.py's ETA counts it)."""

    name: str
    fn: Callable[[StepInfo], Any]
    every: int = 1
    steps: frozenset[int] = frozenset()
    needs_state: bool = False
    at_exit: bool = False
    timed: bool = False

    def due(self, step: int) -> bool:
        return step in self.steps or (self.every > 0 and step % self.every == 0)


def run_hooks(hooks: list[Hook], info: StepInfo, on_time: Callable[[int, str, float], None] | None = None) -> None:
    """Runs ``hooks`` in order on ``info``; ``on_time(step, tag, ms)`` gets each timed hook's duration."""
    for hook in hooks:
        start = time.perf_counter()
        hook.fn(info)
        if hook.timed and on_time is not None:
            on_time(info.step, f"time/{hook.name}_ms", (time.perf_counter() - start) * 1e3)
