"""The anomaly detector on real TensorBoard event files and real dump folders."""

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bitnet_jax import config as config_lib
from bitnet_jax.anomaly import AnomalyDetector, RollingZScore, decode_rows, poison_if_due
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
    texts = {t.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(t)]
             for t in ea.Tags()["tensors"]}
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


def test_loss_and_grad_norm_spikes_by_rolling_zscore(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer)
    rng = np.random.default_rng(0)
    for step in range(1, 31):
        det.on_step_metrics(step, healthy(step, 3.0 + 0.01 * rng.standard_normal()))
    det.on_step_metrics(31, healthy(31, 3.5))  # ~50 sigma above
    det.on_step_metrics(32, {**healthy(32, 3.0), "grad_norm": 40.0})
    det.on_step_metrics(33, healthy(33, 2.9))  # lower is never a spike
    tb.close()
    assert sorted(p.name for p in (tmp_path / "anomalies").iterdir()) == ["31_loss_spike", "32_grad_norm_spike"]
    texts, count = read_events(tmp_path / "tb")
    assert "standard deviations above" in texts["anomaly/loss_spike"][0][1]
    assert count == [(31, 1.0), (32, 2.0)]


def test_rolling_zscore_waits_for_history_and_floors_a_flat_spread():
    z = RollingZScore(window=20)
    assert z.min_history == 5
    for _ in range(4):
        z.add(2.0)
    assert z.score(100.0) is None
    z.add(2.0)
    assert z.score(2.001) == pytest.approx(0.001 / (1e-3 * 2.0))  # flat history: std floored, not zero


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
    assert count[-1] == (3, 3.0) and "anomaly_dumps_max" in texts["anomaly/nonfinite"][-1][1]


def test_state_dict_round_trip_keeps_history(tmp_path, tokenizer):
    det, tb = make_detector(tmp_path, tokenizer)
    for step in range(1, 11):
        det.on_step_metrics(step, healthy(step, 3.0 + step * 0.01))
    det.report(10, "loss_spike", "test")
    state = json.loads(json.dumps(det.state_dict()))  # what a checkpoint's JSON item holds
    other, tb2 = make_detector(tmp_path / "b", tokenizer)
    other.load_state_dict(state)
    tb.close(), tb2.close()
    assert list(other.loss.values) == list(det.loss.values) and len(other.loss.values) == 10
    assert other.count == 1 and other.last_good_step == 10 and other.dumps == 1


def test_poison_only_at_its_step_and_decode_marks_bad_ids(tokenizer):
    rows = batch(1)
    assert poison_if_due(rows, 3, poison_step=0, vocab_size=4096) is rows
    assert poison_if_due(rows, 3, poison_step=4, vocab_size=4096) is rows
    poisoned = poison_if_due(rows, 4, poison_step=4, vocab_size=4096)
    assert poisoned[0, 0] == 4096 and rows[0, 0] != 4096  # a copy: the loader's array is untouched
    ids = tokenizer.encode("hello world")
    assert decode_rows(tokenizer, np.asarray([ids + [9999]])) == ["hello world<bad id 9999>"]
