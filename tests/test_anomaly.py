"""The anomaly detector on real TensorBoard event files and real dump folders."""

import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bitnet_jax import config as config_lib
from bitnet_jax.anomaly import AnomalyDetector, RollingSpike, decode_rows, poison_if_due
from bitnet_jax.config import TokenizerConfig
from bitnet_jax.data import load_tokenizer
from bitnet_jax.metrics import TensorBoard


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TokenizerConfig())


def make_detector(tmp_path, tokenizer, *overrides):
    cfg = config_lib.from_dict(config_lib.apply_overrides({}, ["log.spike_window=20", *overrides]))
    tb = TensorBoard(tmp_path / "tb")
    return AnomalyDetector(cfg, tmp_path, tb, tokenizer), tb


def read_events(tb_dir):
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    texts = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(t)]
             for t in ea.Tags()["tensors"] if ea.SummaryMetadata(t).plugin_data.plugin_name == "text"}
    count = [(e.step, e.value) for e in ea.Scalars("anomaly/count")] if "anomaly/count" in ea.Tags()["scalars"] else []
    return texts, count


def healthy(step, loss):
    return {"loss": loss, "grad_norm": 0.5 + 0.01 * (step % 3), "lr": 1e-3, "wd": 0.1, "stage": 1.0, "skipped": 0.0}


def batch(step, vocab=4096):
    return np.random.default_rng(step).integers(2, vocab, (2, 9)).astype(np.int32)


def test_nonfinite_loss_is_dumped_with_the_batch_of_its_step(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer)
    rows = {}
    for step in range(1, 8):
        rows[step] = poison_if_due(batch(step), step, poison_step=6, vocab_size=4096)
        det.remember_batch(step, rows[step])
        if step >= 2:  # metrics arrive one step behind, as from StepMetrics
            s = step - 1
            det.on_step_metrics(s, healthy(s, 3.0) if s != 6 else {**healthy(s, float("nan")), "skipped": 1.0})
    tb.close()
    dump = tmp_path / "anomalies" / "6_nonfinite"
    info = json.loads((dump / "event.json").read_text())
    assert info["step"] == 6 and info["batch_step"] == 6 and info["last_good_step"] == 5
    assert info["metrics"]["loss"] == "nan" and info["metrics"]["skipped"] == 1.0
    np.testing.assert_array_equal(np.load(dump / "batch_tokens.npy"), rows[6])
    text = (dump / "batch_text.txt").read_text()
    assert "<bad id 4096>" in text and "=== row 1 ===" in text
    texts, count = read_events(tmp_path / "tb")
    assert count == [(6, 1.0)]
    [(step, message)] = texts["anomaly/nonfinite"]
    assert step == 6 and "skipped" in message and "anomalies/6_nonfinite/" in message
    assert det.halt_reason is None and det.last_good_step == 5 and det.count == 1


def test_halt_mode_requests_a_stop(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "train.on_nan=halt")
    det.on_step_metrics(1, healthy(1, 3.0))
    det.on_step_metrics(2, {**healthy(2, float("inf")), "skipped": 1.0})
    tb.close()
    assert det.halt_reason.startswith("step 2:") and "halt" in det.halt_reason
    assert det.last_good_step == 1
    assert (tmp_path / "anomalies" / "2_nonfinite" / "event.json").is_file()


def test_loss_and_grad_norm_spikes_by_rolling_median(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer)  # optim.warmup_steps = 30: judged from step 31 on
    rng = np.random.default_rng(0)
    for step in range(1, 31):
        det.on_step_metrics(step, healthy(step, 3.0 + 0.01 * rng.standard_normal()))
    det.on_step_metrics(31, healthy(31, 3.5))  # ~50 sigma above, but only 1.17x: not a loss spike
    det.on_step_metrics(32, healthy(32, 6.0))  # 2x the median
    det.on_step_metrics(33, {**healthy(33, 3.0), "grad_norm": 40.0})
    det.on_step_metrics(34, healthy(34, 2.9))  # lower is never a spike
    tb.close()
    assert sorted(p.name for p in (tmp_path / "anomalies").iterdir()) == ["32_loss_spike", "33_grad_norm_spike"]
    texts, count = read_events(tmp_path / "tb")
    [(_, message)] = texts["anomaly/loss_spike"]
    assert "loss 6 is 2.0x the median 2.998 of the previous 20 steps" in message
    assert "robust standard deviations of log(loss)" in message
    assert count == [(32, 1.0), (33, 2.0)]


def heavy_tailed_run(steps, seed=0):
    """A healthy run's (loss, grad_norm) per step: lognormal grad norms with routine 2-2.5x bumps
    (every 40-80 steps) on top of a slow drift, and a noisy decreasing loss with 1.2-1.3x bumps."""
    rng = np.random.default_rng(seed)
    out = []
    next_bump = 50
    for step in range(1, steps + 1):
        grad_norm = 0.5 * (1 + step / steps) * math.exp(0.1 * rng.standard_normal())
        loss = (3.0 + 2.0 / math.sqrt(step)) * math.exp(0.02 * rng.standard_normal())
        if step == next_bump:
            grad_norm *= rng.uniform(2.0, 2.5)
            loss *= rng.uniform(1.2, 1.3)
            next_bump += int(rng.integers(40, 80))
        out.append((loss, grad_norm))
    return out


def test_heavy_tailed_healthy_run_has_no_events_and_real_spikes_are_flagged(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "log.spike_window=100")
    series = heavy_tailed_run(2000)
    series[9] = (30.0, 20.0)  # step 10, inside the warm-up (30 steps): transients there are not judged
    for step, (loss, grad_norm) in enumerate(series, start=1):
        det.on_step_metrics(step, {**healthy(step, loss), "grad_norm": grad_norm})
    assert det.count == 0 and not (tmp_path / "anomalies").exists()
    loss, grad_norm = series[-1]
    det.on_step_metrics(2001, {**healthy(2001, loss), "grad_norm": 10 * grad_norm})
    det.on_step_metrics(2002, {**healthy(2002, 2 * loss), "grad_norm": grad_norm})
    tb.close()
    assert det.count == 2
    assert sorted(p.name for p in (tmp_path / "anomalies").iterdir()) == ["2001_grad_norm_spike", "2002_loss_spike"]


def test_flagged_values_stay_out_of_the_window(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "optim.warmup_steps=0")
    for step in range(1, 21):
        det.on_step_metrics(step, healthy(step, 3.0))
    det.on_step_metrics(21, {**healthy(21, 3.0), "grad_norm": 5.0})
    det.on_step_metrics(22, {**healthy(22, 3.0), "grad_norm": 5.0})  # a second spike: judged against the same history
    tb.close()
    assert 5.0 not in det.grad_norm.values and len(det.grad_norm.values) == 20
    assert sorted(p.name for p in (tmp_path / "anomalies").iterdir()) == ["21_grad_norm_spike", "22_grad_norm_spike"]


def test_a_lasting_new_level_becomes_the_baseline(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "optim.warmup_steps=0")  # window 20: 5 values of history
    for step in range(1, 21):
        det.on_step_metrics(step, healthy(step, 3.0))
    for step in range(21, 41):
        det.on_step_metrics(step, {**healthy(step, 3.0), "grad_norm": 6.0 + 0.01 * (step % 3)})
    tb.close()
    # The first 5 steps at the new level are events; then it is the run's level, not a spike.
    assert det.count == 5 and sorted(det.grad_norm.values)[0] >= 6.0
    assert [p.name for p in sorted((tmp_path / "anomalies").iterdir())] == [
        f"{s}_grad_norm_spike" for s in range(21, 26)]


def test_spikes_cannot_use_up_the_dump_of_a_nonfinite_step(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "log.anomaly_dumps_max=2", "optim.warmup_steps=0")
    step = 0
    for spike_at in (30, 60, 90):  # spikes far apart: each one judged against a quiet history
        while step < spike_at:
            step += 1
            det.on_step_metrics(step, healthy(step, 3.0))
        det.on_step_metrics(step, {**healthy(step, 3.0), "grad_norm": 50.0})
    det.on_step_metrics(91, {**healthy(91, float("nan")), "skipped": 1.0})
    tb.close()
    assert det.count == 4
    assert sorted(p.name for p in (tmp_path / "anomalies").iterdir()) == [
        "30_grad_norm_spike", "60_grad_norm_spike", "91_nonfinite"]
    texts, _ = read_events(tmp_path / "tb")
    assert "no dump: log.anomaly_dumps_max=2 grad_norm_spike dumps reached" in texts["anomaly/grad_norm_spike"][-1][1]
    assert "anomalies/91_nonfinite/" in texts["anomaly/nonfinite"][-1][1]


def test_rolling_spike_waits_for_history_floors_a_flat_spread_and_needs_the_ratio():
    r = RollingSpike(window=20, zscore=6.0, min_ratio=3.0)
    assert r.min_history == 5
    for _ in range(4):
        r.add(2.0)
    assert r.score(100.0) is None and r.judge(2.0) is None  # too little history: accepted
    assert list(r.values) == [2.0] * 5
    z, ratio, median = r.score(2.02)
    assert median == pytest.approx(2.0) and ratio == pytest.approx(1.01)
    assert z == pytest.approx(math.log(1.01) / 1e-3)  # flat history: the spread is floored, not zero
    assert r.judge(2.02) is None  # z ~ 10, but 1.01x the median
    assert r.judge(6.5) is not None and 6.5 not in r.values  # z and ratio both over
    r2 = RollingSpike(window=20, zscore=6.0, min_ratio=3.0)
    for x in [1.0, 2.0] * 5:  # a wide spread: 4x the median is under 3 robust sigmas
        r2.add(x)
    assert r2.judge(5.6) is None


def sample(mode, tokens, entropy, index=0):
    return {"step": 10, "prompt_index": index, "prompt": "p", "mode": mode, "text": "t", "tokens": tokens,
            "num_tokens": len(tokens), "entropy": entropy,
            "repetition": 1 - len({tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)}) / max(len(tokens) - 3, 1)}


def test_entropy_collapse_and_repetition_judge_typical_samples(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer)
    det.remember_batch(10, batch(10))
    loop = [5, 6, 7] * 8
    det.check_samples(10, [
        sample("greedy", loop, 0.01),  # greedy loops by nature: not judged
        sample("typical", list(range(20, 44)), 0.1, index=1),  # collapsed entropy
        sample("typical", loop, 3.0, index=2),  # repetition
        sample("stress", loop, 0.01),
        sample("typical", [9, 9], 0.0, index=3),  # too short to judge
    ])
    tb.close()
    collapse = json.loads((tmp_path / "anomalies" / "10_entropy_collapse" / "samples.json").read_text())
    assert [s["prompt_index"] for s in collapse] == [1]
    repetition = json.loads((tmp_path / "anomalies" / "10_repetition" / "samples.json").read_text())
    assert [s["prompt_index"] for s in repetition] == [2]
    assert det.count == 2


def test_dump_cap_keeps_counting_in_tensorboard(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "log.anomaly_dumps_max=1")
    for step in (1, 2, 3):
        det.on_step_metrics(step, {**healthy(step, float("nan")), "skipped": 1.0})
    tb.close()
    assert [p.name for p in (tmp_path / "anomalies").iterdir()] == ["1_nonfinite"]
    texts, count = read_events(tmp_path / "tb")
    assert count[-1] == (3, 3.0) and "anomaly_dumps_max=1 nonfinite dumps" in texts["anomaly/nonfinite"][-1][1]


def test_state_dict_round_trip_keeps_history(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer)
    for step in range(1, 11):
        det.on_step_metrics(step, healthy(step, 3.0 + step * 0.01))
    det.report(10, "loss_spike", "test")
    det.grad_norm.pending = [9.0]
    state = json.loads(json.dumps(det.state_dict()))  # what a checkpoint's JSON item holds
    other, tb2 = make_detector(tmp_path / "b", tokenizer)
    other.load_state_dict(state)
    tb.close(), tb2.close()
    assert list(other.loss.values) == list(det.loss.values) and len(other.loss.values) == 10
    assert other.grad_norm.pending == [9.0]
    assert other.count == 1 and other.last_good_step == 10 and other.dumps == {"loss_spike": 1}
    assert state["dumps"] == 1  # the total, as checkpoints from before per-kind budgets held it


def test_a_checkpoint_with_one_dump_total_keeps_nonfinite_dumps_available(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "log.anomaly_dumps_max=3")
    det.load_state_dict({"loss_window": [3.0] * 5, "grad_norm_window": [0.5] * 5, "count": 3, "dumps": 3,
                         "last_good_step": 7})
    assert det.report(8, "loss_spike", "x") is None  # every other kind: the old total applies
    assert det.report(9, "nonfinite", "y").name == "9_nonfinite"
    tb.close()
    assert det.count == 5


def test_poison_only_at_its_step_and_decode_marks_bad_ids(tokenizer):
    rows = batch(1)
    assert poison_if_due(rows, 3, poison_step=0, vocab_size=4096) is rows
    assert poison_if_due(rows, 3, poison_step=4, vocab_size=4096) is rows
    poisoned = poison_if_due(rows, 4, poison_step=4, vocab_size=4096)
    assert poisoned[0, 0] == 4096 and rows[0, 0] != 4096  # a copy: the loader's array is untouched
    ids = tokenizer.encode("hello world")
    assert decode_rows(tokenizer, np.asarray([ids + [9999]])) == ["hello world<bad id 9999>"]


def nonfinite(step):
    return {**healthy(step, float("nan")), "skipped": 1.0}


def test_halt_mode_names_the_first_nonfinite_step_not_the_last(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "train.on_nan=halt")
    det.on_step_metrics(1, healthy(1, 3.0))
    det.on_step_metrics(2, nonfinite(2))
    det.on_step_metrics(3, nonfinite(3))  # fetched before the stop check: must not replace step 2
    tb.close()
    assert det.halt_reason.startswith("step 2: ") and det.skipped == 2


def test_skip_mode_halts_past_max_skipped_consecutive(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "train.max_skipped_consecutive=3")
    for step in range(1, 5):
        det.on_step_metrics(step, nonfinite(step))
        assert (det.halt_reason is None) == (step <= 3), step  # 3 in a row tolerated, the 4th is one too many
    tb.close()
    assert det.halt_reason == ("train.max_skipped_consecutive=3 exceeded: 4 updates skipped in all, 4 in a row up "
                               "to step 4")


def test_skip_mode_halts_past_max_skipped_in_all_and_the_count_survives_a_resume(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer, "train.max_skipped=3")
    for step in range(1, 6):  # every other step skipped: never two in a row
        det.on_step_metrics(step, nonfinite(step) if step % 2 else healthy(step, 3.0))
    assert det.halt_reason is None and det.skipped == 3 and det.skipped_in_a_row == 1
    resumed, _ = make_detector(tmp_path / "resumed", tokenizer, "train.max_skipped=3")
    resumed.load_state_dict(json.loads(json.dumps(det.state_dict())))
    resumed.on_step_metrics(6, healthy(6, 3.0))
    resumed.on_step_metrics(7, nonfinite(7))
    tb.close()
    assert resumed.halt_reason == "train.max_skipped=3 exceeded: 4 updates skipped in all, 1 in a row up to step 7"


@pytest.mark.parametrize("key", ["train.max_skipped", "train.max_skipped_consecutive"])
def test_skip_limits_are_validated(key):
    with pytest.raises(config_lib.ConfigError, match=rf"^{key} must be >= 1, got 0; it is how many .*set train\.on_nan=halt\)$"):
        config_lib.from_dict(config_lib.apply_overrides({}, [f"{key}=0"]))
    assert config_lib.from_dict({}).train.max_skipped == 100
    assert config_lib.from_dict({}).train.max_skipped_consecutive == 10
