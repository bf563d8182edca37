"""The train loop with a stub step: hooks one step behind the device, state hooks in sync, stop checks,
the end of the data, exit hooks, and hook time left out of step time."""

import jax.numpy as jnp
import pytest

from bitnet_jax.hooks import Hook
from bitnet_jax.loop import END_OF_DATA, run_loop
from bitnet_jax.metrics import StepMetrics


class StubStep:
    """``state`` is the number of steps taken; the loss is 10 - step. Counts dispatches, so a hook can
    tell how far the 'device' had got when it ran."""

    def __init__(self):
        self.dispatched = 0

    def __call__(self, state, batch):
        self.dispatched += 1
        assert batch == state + 1  # the loop hands batches in order
        return state + 1, {"loss": jnp.float32(10.0 - self.dispatched), "lr": jnp.float32(1e-3),
                           "wd": jnp.float32(0.1), "grad_norm": jnp.float32(1.0),
                           "stage": jnp.float32(1), "skipped": jnp.float32(0)}


def fetcher() -> StepMetrics:
    return StepMetrics(tokens_per_step=8, flops_per_token=1.0, peak_flops_total=None)


def record(log: list, step_fn: StubStep, name: str):
    return lambda info: log.append((name, info.step, step_fn.dispatched, info.state, info.final,
                                    info.metrics.get("loss")))


def test_hooks_run_one_step_behind_and_state_hooks_in_sync():
    step_fn, log = StubStep(), []
    hooks = [Hook("every", record(log, step_fn, "every")),
             Hook("third", record(log, step_fn, "third"), every=3, needs_state=True),
             Hook("exit", record(log, step_fn, "exit"), every=0, at_exit=True, needs_state=True)]
    end = run_loop(step_fn, 0, iter(range(1, 100)), start_step=0, end_step=7, fetcher=fetcher(), hooks=hooks,
                   stops=[])
    assert (end.step, end.state, end.stopped_by) == (7, 7, None)
    every = [(s, d) for name, s, d, *_ in log if name == "every"]
    # Step s's metrics reach the per-step hooks after step s + 1 was dispatched, except at a state
    # hook's step (3, 6: the loop syncs there) and at the end.
    assert every == [(1, 2), (2, 3), (3, 3), (4, 5), (5, 6), (6, 6), (7, 7)]
    third = [(s, d, state, loss) for name, s, d, state, _, loss in log if name == "third"]
    assert third == [(3, 3, 3, 7.0), (6, 6, 6, 4.0)]  # the state and this step's own metrics
    # The per-step hooks of a synced step run before its state hooks (e.g. the anomaly check before a save).
    names = [name for name, s, *_ in log if s == 3]
    assert names == ["every", "third"]
    assert [entry[1:5] for entry in log if entry[0] == "exit"] == [(7, 7, 7, True)]


def test_a_stop_check_ends_the_loop_and_exit_hooks_see_the_last_step():
    step_fn, log = StubStep(), []
    hooks = [Hook("exit", record(log, step_fn, "exit"), every=0, at_exit=True, needs_state=True)]
    stops = [lambda step: None, lambda step: "a test stop" if step == 4 else None]
    end = run_loop(step_fn, 2, iter(range(3, 100)), start_step=2, end_step=10, fetcher=fetcher(), hooks=hooks,
                   stops=stops)
    assert (end.step, end.state, end.stopped_by, step_fn.dispatched) == (4, 4, "a test stop", 2)
    assert log == [("exit", 4, 2, 4, True, 8.0)]


def test_the_end_of_the_data_stops_the_loop():
    step_fn = StubStep()
    end = run_loop(step_fn, 0, iter(range(1, 4)), start_step=0, end_step=10, fetcher=fetcher(), hooks=[], stops=[])
    assert (end.step, end.stopped_by) == (3, END_OF_DATA)


def test_timed_hooks_report_their_duration_and_a_session_without_steps_has_no_metrics():
    step_fn, times, finals = StubStep(), [], []
    hooks = [Hook("slow", lambda info: None, every=2, needs_state=True, timed=True),
             Hook("exit", lambda info: finals.append(dict(info.metrics)), every=0, at_exit=True)]
    run_loop(step_fn, 0, iter(range(1, 100)), start_step=0, end_step=4, fetcher=fetcher(), hooks=hooks, stops=[],
             on_time=lambda step, tag, ms: times.append((step, tag)))
    assert times == [(2, "time/slow_ms"), (4, "time/slow_ms")]
    assert finals[0]["loss"] == pytest.approx(6.0)
    finals.clear()
    run_loop(StubStep(), 0, iter(()), start_step=0, end_step=4, fetcher=fetcher(), hooks=hooks, stops=[])
    assert finals == [{}]  # the data ran out before the first step: nothing to report
