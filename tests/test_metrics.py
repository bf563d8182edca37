"""StepMetrics: one step behind, hook time left out of step time, throughput and MFU from the clock,
written to a real TensorBoard event file and read back."""

import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import metrics as metrics_lib
from bitnet_jax.eventfile import EventLog
from bitnet_jax.hooks import StepInfo


class FakeClock:
    """``time.perf_counter`` under the test's control: step times are exact, nothing sleeps."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _device_metrics(step: int) -> dict:
    return {"loss": jnp.float32(5.0 - 0.5 * step), "lr": jnp.float32(1e-3), "wd": jnp.float32(0.1),
            "grad_norm": jnp.float32(1.5), "stage": jnp.float32(1), "skipped": jnp.float32(0)}


def test_metrics_are_fetched_one_step_behind_without_hook_time(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics_lib.time, "perf_counter", clock)
    tb = metrics_lib.TensorBoard(tmp_path)
    m = metrics_lib.StepMetrics(tokens_per_step=1000, flops_per_token=6e6, peak_flops_total=1e12)
    write = metrics_lib.train_scalars_hook(tb).fn
    seen = []

    def fetched(infos):
        for step, host in infos:
            seen.append(step)
            write(StepInfo(step, host))

    m.start_clock()
    clock.now += 0.5
    fetched(m.push(1, _device_metrics(1)))
    assert seen == []  # step 1 is still in flight: pushing it fetches nothing
    clock.now += 0.25
    fetched(m.push(2, _device_metrics(2)))
    assert seen == [1]  # pushing step 2 fetched step 1, not step 2

    with m.paused():  # a hook runs for 10 s between steps: not step time
        clock.now += 10.0
    clock.now += 0.2
    fetched(m.push(3, _device_metrics(3)))
    fetched(m.flush())
    assert seen == [1, 2, 3]
    tb.close()

    log = EventLog(tmp_path)
    log.update()
    # Step k's time runs from the fetch of step k-1 (the clock's start for step 1) to its own fetch.
    assert log.scalars("train/step_time_ms").values.tolist() == pytest.approx([750.0, 200.0, 0.0])
    assert log.scalars("train/step_time_ms").steps.tolist() == [1, 2, 3]
    tps = log.scalars("train/tokens_per_sec").values.tolist()
    assert tps[:2] == pytest.approx([1000 / 0.75, 1000 / 0.2])
    assert log.scalars("train/mfu").values.tolist()[:2] == pytest.approx([t * 6e6 / 1e12 for t in tps[:2]])
    assert log.scalars("train/tokens_seen").values.tolist() == [1000, 2000, 3000]
    assert log.scalars("train/loss").values.tolist() == [4.5, 4.0, 3.5]
    assert "train/skipped_updates" not in log.tags()  # written only when an update was dropped
    assert m.mean_loss_since(1) == pytest.approx(3.75)


def test_recent_losses_survive_a_checkpoint_for_the_eval_gap(tmp_path):
    import json

    before = metrics_lib.StepMetrics(tokens_per_step=10, flops_per_token=1.0, peak_flops_total=None)
    before.start_clock()
    for step in range(1, 8):
        before.push(step, _device_metrics(step))
    before.flush()
    saved = json.loads(json.dumps(before.state_dict()))  # it goes through the checkpoint's JSON meta
    after = metrics_lib.StepMetrics(tokens_per_step=10, flops_per_token=1.0, peak_flops_total=None)
    after.load_state_dict(saved)
    assert list(after.losses) == list(before.losses)
    assert after.mean_loss_since(4) == before.mean_loss_since(4) == pytest.approx(np.mean([2.5, 2.0, 1.5]))


def test_custom_scalars_layout_is_written_once_with_the_run_curves_first(tmp_path):
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    tb = metrics_lib.TensorBoard(tmp_path)
    tb.scalars(1, {"train/loss": 3.0, "bitnet/layers.0.mlp.up_proj/frac_zero": 0.3, "bitnet/model/frac_zero": 0.3})
    tb.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    ea.Reload()
    (event,) = ea.Tensors(metadata.CONFIG_SUMMARY_TAG)  # the tag TensorBoard's Custom Scalars plugin reads
    assert ea.SummaryMetadata(metadata.CONFIG_SUMMARY_TAG).plugin_data.plugin_name == metadata.PLUGIN_NAME
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles == ["1 training", "2 eval", "3 progress and time", "4 bitnet: model", "5 bitnet: per layer"]
    first = [(chart.title, list(chart.multiline.tag)) for chart in layout.category[0].chart]
    assert first == [("loss (train and eval)", ["^train/loss$", "^eval/loss$"]),
                     ("learning rate", ["^train/lr$"]), ("weight decay", ["^train/wd$"]),
                     ("grad norm", ["^train/grad_norm$"]), ("throughput (tokens/s)", ["^train/tokens_per_sec$"]),
                     ("MFU", ["^train/mfu$"])]

    def charts_of(tag):
        return [(c.title, ch.title) for c in layout.category for ch in c.chart
                if any(re.match(r, tag) for r in ch.multiline.tag)]

    # The plugin matches each regex with re.match: per-layer and model-wide statistics land apart.
    assert charts_of("bitnet/layers.0.mlp.up_proj/frac_zero") == [("5 bitnet: per layer", "frac_zero (every layer)")]
    assert charts_of("bitnet/model/frac_zero") == [("4 bitnet: model", "ternary fractions (-1, 0, +1)")]
