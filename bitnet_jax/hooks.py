"""Periodic work registered on the train loop: ``Hook(name, every, fn)`` instead of ``if step % N``."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable


@dataclasses.dataclass
class Hook:
    """Runs ``fn(step)`` after every ``every``-th step, at the final step when ``at_end``, and at the
    listed ``steps`` (the checkpoint's mandatory ones); ``every = 0`` leaves only ``steps``.
    ``timing_tag`` names a ``time/*`` scalar that records how long the hook took."""

    name: str
    every: int
    fn: Callable[[int], None]
    at_end: bool = True
    timing_tag: str | None = None
    steps: frozenset[int] = frozenset()

    def due(self, step: int, last_step: int) -> bool:
        if step in self.steps:
            return True
        if not self.every:
            return False
        return step % self.every == 0 or (self.at_end and step == last_step)


def run_hooks(hooks: list[Hook], step: int, on_time=None) -> None:
    """Runs ``hooks`` (those due at ``step``); ``on_time(tag, ms)`` gets each timed hook's duration."""
    for hook in hooks:
        start = time.perf_counter()
        hook.fn(step)
        if hook.timing_tag and on_time is not None:
            on_time(hook.timing_tag, (time.perf_counter() - start) * 1e3)
