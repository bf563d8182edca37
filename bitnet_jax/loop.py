"""The train loop proper: stop checks, the next batch, the step, the hooks. Nothing else.

Step s is dispatched, then step s-1's metrics are fetched (they are ready by then) and the hooks
that do not need the train state run on them: the host never waits for the device. At a step where
a hook needs the state (eval, samples, a checkpoint), the loop fetches step s's metrics at once,
runs the one-behind hooks on them, then the state hooks, with the clock paused so their time is not
counted as step time. When the loop ends, the last metrics are fetched and the ``at_exit`` hooks run
once with ``info.final``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

from bitnet_jax.hooks import Hook, StepInfo, run_hooks
from bitnet_jax.metrics import StepMetrics

END_OF_DATA = "the end of the data (data.repeat=false)"


@dataclasses.dataclass
class LoopEnd:
    step: int  # the last completed step
    state: Any  # the train state after it
    stopped_by: str | None  # why the loop ended before end_step, in words (None: it reached end_step)


def run_loop(step_fn: Callable, state, batches: Iterator, *, start_step: int, end_step: int,
             fetcher: StepMetrics, hooks: list[Hook], stops: list[Callable[[int], str | None]],
             on_time: Callable[[int, str, float], None] | None = None) -> LoopEnd:
    """Runs ``state, device_metrics = step_fn(state, batch)`` from ``start_step`` until ``end_step``,
    a stop check returns a reason (``stops``: checked before every step, given the current step), or
    ``batches`` runs out. ``on_time(step, tag, ms)`` records the timed hooks' durations."""
    behind = [h for h in hooks if not h.needs_state]
    synced = [h for h in hooks if h.needs_state]

    def fetched(infos: list[tuple[int, dict]]) -> None:
        for step_done, host in infos:
            run_hooks([h for h in behind if h.due(step_done)], StepInfo(step_done, host), on_time)

    step, stopped_by = start_step, None
    fetcher.start_clock()
    while step < end_step:
        stopped_by = next((reason for reason in (check(step) for check in stops) if reason), None)
        if stopped_by:
            break
        try:
            batch = next(batches)
        except StopIteration:
            stopped_by = END_OF_DATA
            break
        state, device_metrics = step_fn(state, batch)
        step += 1
        fetched(fetcher.push(step, device_metrics))
        due = [h for h in synced if h.due(step)]
        if due:
            fetched(fetcher.flush())  # the device syncs here anyway; hooks see this step's values
            with fetcher.paused():
                run_hooks(due, StepInfo(step, dict(fetcher.last), state), on_time)
    fetched(fetcher.flush())
    final = StepInfo(step, dict(fetcher.last) if fetcher.last.get("step") == step else {}, state, final=True)
    run_hooks([h for h in hooks if h.at_exit], final, on_time)
    return LoopEnd(step, state, stopped_by)
