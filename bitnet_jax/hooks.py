"""Periodic work registered on the train loop: ``Hook(name, every, fn)`` instead of ``if step % N``."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable


@dataclasses.dataclass
class Hook:
    """Runs ``fn(step)`` after every ``every``-th step, and at the final step when ``at_end``;
    ``every = 0`` disables the hook entirely, and ``when(step)``, if given, decides instead.
    ``timing_tag`` names a ``time/*`` scalar that records how long the hook took."""

    name: str
    every: int
    fn: Callable[[int], None]
    at_end: bool = True
    timing_tag: str | None = None
    when: Callable[[int], bool] | None = None  # replaces the every/at_end rule (e.g. mandatory steps)

    def due(self, step: int, last_step: int) -> bool:
        if self.when is not None:
            return self.when(step)
        if not self.every:
            return False
        return step % self.every == 0 or (self.at_end and step == last_step)


def run_due_hooks(hooks: list[Hook], step: int, last_step: int, on_time=None) -> bool:
    """Runs the hooks due at ``step``; returns whether any ran. ``on_time(tag, ms)`` gets each
    timed hook's duration."""
    ran = False
    for hook in hooks:
        if hook.due(step, last_step):
            start = time.perf_counter()
            hook.fn(step)
            ran = True
            if hook.timing_tag and on_time is not None:
                on_time(hook.timing_tag, (time.perf_counter() - start) * 1e3)
    return ran
