"""The direct event-file reader against tensorboardX-written files, tensorboardX's own protos and
tensorboard's EventAccumulator: exact values, torn tails, incremental reads, restarts."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2

from bitnet_jax import eventfile
from bitnet_jax.eventfile import EventFileReader, EventLog, crc32c, decode_event, masked_crc

WALL = 1_700_000_000.0


def frame_records(buf: bytes) -> tuple[list[int], int]:
    """The header offsets of the contiguous run of complete, CRC-checked records at the start of
    ``buf``, and where it ends (the reader's framing step, before any resynchronisation)."""
    offsets, stop = eventfile._frame(buf)
    return offsets.tolist(), stop


def iter_events(path: Path):
    """Every complete event of one file, in file order, through the public ``decode_event``."""
    buf = path.read_bytes()
    for off in frame_records(buf)[0]:
        (length,) = struct.unpack_from("<Q", buf, off)
        yield decode_event(buf, off + 12, off + 12 + length)


def _write(folder: Path, scalars=(), texts=(), suffix: str = "") -> Path:
    """One event file: ``scalars`` as (tag, step, value), ``texts`` as (tag, step, text)."""
    before = set(folder.glob("*tfevents*"))
    w = SummaryWriter(str(folder), filename_suffix=suffix, flush_secs=3600, max_queue=100_000)
    for i, (tag, step, value) in enumerate(scalars):
        w.add_scalar(tag, value, step, walltime=WALL + i)
    for tag, step, text in texts:
        w.add_text(tag, text, step, walltime=WALL + step)
    w.close()
    (path,) = set(folder.glob("*tfevents*")) - before
    return path


def _records(path: Path) -> list[bytes]:
    """Each framed record's full bytes (header, data, footer)."""
    buf = path.read_bytes()
    offsets, stop = frame_records(buf)
    return [buf[a:b] for a, b in zip(offsets, offsets[1:] + [stop])]


def _proto_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The reference: every record parsed with tensorboardX's compiled protos."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in _records(path):
        ev = event_pb2.Event.FromString(rec[12:-4])
        for v in ev.summary.value:
            if v.WhichOneof("value") == "simple_value":
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


SCALARS = [("train/loss", s, 10.0 / s) for s in range(1, 400)] + [
    ("train/lr", 0, 0.0),  # step 0: the field is absent from the message
    ("train/lr", 1, 1.2345678e-3),
    ("train/lr", 2**40, -3.5),  # a long varint step
    ("odd/nan", 5, float("nan")),
    ("odd/inf", 5, float("inf")),
    ("odd/tiny", 5, 1e-42),  # a float32 subnormal
    ("a/" + "x" * 130, 7, 1.5),  # a tag too long for the vectorised path
]


def test_scalars_are_bit_exact_against_tensorboardx_protos(tmp_path):
    path = _write(tmp_path, SCALARS)
    reader = EventFileReader(path)
    assert reader.read() == len(SCALARS) + 1  # + the file_version event
    expected = _proto_scalars(path)
    assert sorted(reader.tags()) == sorted(expected)
    for tag, pairs in expected.items():
        s = reader.raw_series(tag)
        assert s.steps.tolist() == [p[0] for p in pairs]
        np.testing.assert_array_equal(s.values, np.array([p[1] for p in pairs]))  # NaN == NaN here
    assert reader.raw_series("train/lr").steps.tolist() == [0, 1, 2**40]
    assert reader.raw_series("train/lr").values[1] == float(np.float32(1.2345678e-3))
    first = event_pb2.Event.FromString(_records(path)[0][12:-4])
    assert first.file_version and reader.first_wall_time == first.wall_time  # the writer's opening time
    assert reader.last_wall_time == max(first.wall_time, WALL + len(SCALARS) - 1)


def test_merged_scalars_equal_event_accumulator_keep_everything(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    scalars = [(f"t/{k}", s, math.sin(s * (k + 1))) for s in range(1, 300) for k in range(5)]
    _write(tmp_path, scalars)
    acc = ea.EventAccumulator(str(tmp_path), size_guidance=dict(ea.STORE_EVERYTHING_SIZE_GUIDANCE))
    acc.Reload()
    log = EventLog(tmp_path)
    log.update()
    assert sorted(log.tags()) == sorted(acc.Tags()["scalars"])
    for tag in log.tags():
        events = acc.Scalars(tag)
        s = log.scalars(tag)
        assert s.steps.tolist() == [e.step for e in events]
        assert s.values.tolist() == [e.value for e in events]
        assert s.wall_times.tolist() == [e.wall_time for e in events]


def test_text_events_decode_with_the_summary_suffix_dropped(tmp_path):
    text = "héllo\nworld ✓ " * 20
    path = _write(tmp_path, texts=[("samples/0/greedy", 100, text), ("anomaly/loss_spike", 7, "z=9.1")])
    reader = EventFileReader(path)
    reader.read()
    assert reader.texts["samples/0/greedy"][0].step == 100
    assert reader.texts["samples/0/greedy"][0].text == text
    assert reader.texts["anomaly/loss_spike"][0].text == "z=9.1"
    assert reader.tags() == []  # no scalars


def test_tensor_scalars_and_multi_value_events_and_histograms(tmp_path):
    w = SummaryWriter(str(tmp_path), flush_secs=3600)

    def tensor_value(tag, **kw):
        shape = tensor_shape_pb2.TensorShapeProto()
        return summary_pb2.Summary.Value(tag=tag, tensor=tensor_pb2.TensorProto(tensor_shape=shape, **kw))

    summary = summary_pb2.Summary(value=[
        tensor_value("new/float", dtype="DT_FLOAT", float_val=[0.25]),
        tensor_value("new/double", dtype="DT_DOUBLE", double_val=[0.1]),
        tensor_value("new/int64", dtype="DT_INT64", int64_val=[-7]),
        tensor_value("new/content", dtype="DT_DOUBLE", tensor_content=struct.pack("<d", 2.5)),
        summary_pb2.Summary.Value(tag="two/a", simple_value=1.0),
        summary_pb2.Summary.Value(tag="two/b", simple_value=2.0),
    ])
    w.file_writer.add_summary(summary, 3, walltime=WALL)
    w.add_histogram("hist/w", np.arange(10.0), 3, walltime=WALL)
    w.close()
    log = EventLog(tmp_path)
    log.update()
    got = {t: (log.scalars(t).steps.tolist(), log.scalars(t).values.tolist()) for t in log.tags()}
    assert got == {"new/float": ([3], [0.25]), "new/double": ([3], [0.1]), "new/int64": ([3], [-7.0]),
                   "new/content": ([3], [2.5]), "two/a": ([3], [1.0]), "two/b": ([3], [2.0])}


def test_every_torn_tail_is_ignored_and_read_once_complete(tmp_path):
    path = _write(tmp_path, [("train/loss", s, s / 4) for s in range(1, 6)])
    records = _records(path)
    whole = b"".join(records)
    head = b"".join(records[:-1])
    live = tmp_path / "live" / path.name
    live.parent.mkdir()
    for cut in range(len(records[-1])):  # the writer stopped after `cut` bytes of the last record
        live.write_bytes(head + records[-1][:cut])
        reader = EventFileReader(live)
        assert reader.read() == len(records) - 1
        assert reader.raw_series("train/loss").steps.tolist() == [1, 2, 3, 4]
        assert reader.offset == len(head)
        live.write_bytes(whole)  # the writer finished the record
        assert reader.read() == 1
        assert reader.raw_series("train/loss").steps.tolist() == [1, 2, 3, 4, 5]
        assert reader.offset == len(whole)


def test_incremental_reads_decode_only_appended_records(tmp_path):
    path = _write(tmp_path, [("train/loss", s, 1.0 / s) for s in range(1, 101)])
    records = _records(path)
    live = tmp_path / "live" / path.name
    live.parent.mkdir()
    reader = EventFileReader(live)
    written = 0
    new_counts = []
    for end in (1, 30, 31, 75, len(records)):
        with open(live, "ab") as f:
            f.write(b"".join(records[written:end]))
        written = end
        new_counts.append(reader.read())
    assert new_counts == [1, 29, 1, 44, 26]
    assert reader.read() == 0
    s = reader.raw_series("train/loss")
    assert s.steps.tolist() == list(range(1, 101))
    assert s.values.tolist() == [float(np.float32(1.0 / k)) for k in range(1, 101)]


def test_a_rewritten_shorter_file_is_read_again_from_the_start(tmp_path):
    path = _write(tmp_path, [("x", s, s) for s in range(1, 50)])
    reader = EventFileReader(path)
    reader.read()
    records = _records(path)
    path.write_bytes(b"".join(records[:10]))
    assert reader.read() == 10
    assert reader.raw_series("x").steps.tolist() == list(range(1, 10))


def test_restart_newest_file_wins_and_drops_the_abandoned_stretch(tmp_path):
    # First run logs steps 1..30 (eval at 10, 20, 30) and dies; it resumes from checkpoint 20.
    _write(tmp_path, [("train/loss", s, 1.0) for s in range(1, 31)]
           + [("eval/loss", s, 5.0) for s in (10, 20, 30)], suffix=".a")
    _write(tmp_path, [("train/loss", s, 2.0) for s in range(21, 26)], suffix=".b")
    log = EventLog(tmp_path)
    log.update()
    loss = log.scalars("train/loss")
    assert loss.steps.tolist() == list(range(1, 26))  # 26..30 belonged to the abandoned run
    assert loss.values.tolist() == [1.0] * 20 + [2.0] * 5
    assert log.scalars("eval/loss").steps.tolist() == [10, 20]
    # It runs on past the crash point: a third file's values win where they overlap.
    _write(tmp_path, [("train/loss", s, 3.0) for s in range(24, 41)] + [("eval/loss", 30, 6.0)], suffix=".c")
    log.update()
    loss = log.scalars("train/loss")
    assert loss.steps.tolist() == list(range(1, 41))
    assert loss.values.tolist() == [1.0] * 20 + [2.0] * 3 + [3.0] * 17
    assert log.scalars("eval/loss").values.tolist() == [5.0, 5.0, 6.0]
    assert len(log.files) == 3


def test_files_are_ordered_by_their_first_event_not_their_name(tmp_path):
    _write(tmp_path, [("x", 1, 1.0), ("x", 2, 1.0)], suffix=".zzz")  # older, sorts last by name
    _write(tmp_path, [("x", 2, 2.0)], suffix=".aaa")
    log = EventLog(tmp_path)
    log.update()
    assert [p.name.endswith(".zzz") for p in log.files] == [True, False]
    assert log.scalars("x").values.tolist() == [1.0, 2.0]


def test_repeated_step_in_one_file_keeps_the_later_value(tmp_path):
    _write(tmp_path, [("x", 1, 1.0), ("x", 2, 1.0), ("x", 2, 9.0), ("x", 3, 1.0)])
    log = EventLog(tmp_path)
    log.update()
    assert log.scalars("x").values.tolist() == [1.0, 9.0, 1.0]
    assert log.scalars("x").at(2) == 9.0 and log.scalars("x").at(4) is None


def test_iter_events_and_decode_event_read_the_same_as_the_protos(tmp_path):
    path = _write(tmp_path, SCALARS[:5], texts=[("note", 3, "text")])
    events = list(iter_events(path))
    assert events[0].file_version == "brain.Event:2"
    for rec, ev in zip(_records(path), events):
        ref = event_pb2.Event.FromString(rec[12:-4])
        assert (ev.step, ev.wall_time) == (ref.step, ref.wall_time)
        assert decode_event(rec, 12, len(rec) - 4) == ev


# --------------------------------------------------------------------------- CRCs: zero-filled tails

def test_crc32c_matches_tensorboardx_on_short_long_and_empty_ranges():
    from tensorboardX.crc32c import crc32c as reference
    from tensorboardX.record_writer import masked_crc32c

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 12_000, dtype=np.uint8)
    starts = np.concatenate([np.arange(20), rng.integers(0, 4_000, 40), [0, 1, 2, 3]])
    lengths = np.concatenate([np.arange(20), rng.integers(0, 8_000, 40), [4096, 5000, 1024, 1025]])
    got = crc32c(data, starts, lengths)
    assert got.dtype == np.uint32
    assert got.tolist() == [reference(data[s:s + n].tobytes()) for s, n in zip(starts, lengths)]
    assert int(crc32c(np.frombuffer(b"123456789", np.uint8), [0], [9])[0]) == 0xE3069283  # the check value
    header = struct.pack("<Q", 0)
    assert int(masked_crc(crc32c(np.frombuffer(header, np.uint8), [0], [8]))[0]) == masked_crc32c(header)
    assert eventfile._ZERO_LENGTH_CRC == masked_crc32c(header)  # frame_records' shortcut for a zero length


def test_zero_filled_tail_is_left_for_later_and_read_once_the_bytes_land(tmp_path):
    """The file's size grew before its bytes did (zeros read where the last records will be): at a
    record boundary, inside a header, inside the data, or with the data half there."""
    path = _write(tmp_path, [("train/loss", s, s / 4) for s in range(1, 7)])
    records = _records(path)
    whole = b"".join(records)
    head = b"".join(records[:-2])
    tail = records[-2] + records[-1]
    live = tmp_path / "live" / path.name
    live.parent.mkdir()
    for landed in range(len(records[-2])):  # bytes of the second-to-last record already there
        live.write_bytes(head + tail[:landed] + bytes(len(tail) - landed))
        reader = EventFileReader(live)
        assert reader.read() == len(records) - 2, landed
        assert reader.offset == len(head)
        assert reader.raw_series("train/loss").steps.tolist() == [1, 2, 3, 4]
        live.write_bytes(whole)  # the bytes landed
        assert reader.read() == 2
        assert reader.raw_series("train/loss").steps.tolist() == [1, 2, 3, 4, 5, 6]
        assert reader.raw_series("train/loss").values.tolist() == [s / 4 for s in range(1, 7)]
        assert reader.offset == len(whole)


def test_a_record_with_a_bad_crc_stops_the_framing_there(tmp_path):
    """The framing step stops at a bad record; whether the reader then reads on past it (damage) or
    waits (a tail still landing) is ``_resync``'s decision, tested below."""
    path = _write(tmp_path, [("x", s, 1.0) for s in range(1, 6)])
    records = _records(path)
    for where in (0, 8, 12, -1):  # a bit flipped in the length, its CRC, the data, the data's CRC
        bad = bytearray(records[3])
        bad[where] ^= 0x01
        buf = b"".join(records[:3]) + bytes(bad) + records[4]
        offsets, stop = frame_records(buf)
        assert (len(offsets), stop) == (3, len(b"".join(records[:3]))), where
    zeros = b"".join(records) + bytes(4096)
    assert frame_records(zeros) == (frame_records(b"".join(records))[0], len(b"".join(records)))


# --------------------------------------------------------------------------- damage in the middle

@pytest.mark.parametrize("where", [0, 7, 8, 12, 20, -1])  # length (low and high byte), its CRC, data, data CRC
def test_a_damaged_record_in_the_middle_is_skipped_and_reported(tmp_path, where):
    path = _write(tmp_path, [("train/loss", s, s / 4) for s in range(1, 101)])
    records = _records(path)
    at = len(b"".join(records[:40]))  # record 40 holds step 40
    buf = bytearray(path.read_bytes())
    buf[at + where if where >= 0 else at + len(records[40]) + where] ^= 0x5A
    path.write_bytes(bytes(buf))
    reader = EventFileReader(path)
    assert reader.read() == len(records) - 1
    assert reader.raw_series("train/loss").steps.tolist() == [s for s in range(1, 101) if s != 40]
    assert reader.raw_series("train/loss").values.tolist() == [s / 4 for s in range(1, 101) if s != 40]
    assert reader.damaged == [(at, len(records[40]))]
    assert reader.offset == len(buf) and reader.read() == 0


def test_damage_is_decided_only_once_valid_records_follow_it(tmp_path):
    """A bad record at the end may be one still landing: the reader waits there; once the writer
    appends valid records behind it, it is damage, skipped and reported."""
    path = _write(tmp_path, [("x", s, float(s)) for s in range(1, 21)])
    records = _records(path)
    bad = bytearray(records[10])
    bad[-6] ^= 0x01  # inside the data
    live = tmp_path / "live" / path.name
    live.parent.mkdir()
    live.write_bytes(b"".join(records[:10]) + bytes(bad))
    reader = EventFileReader(live)
    assert reader.read() == 10 and reader.damaged == [] and reader.offset == len(b"".join(records[:10]))
    with open(live, "ab") as f:
        f.write(b"".join(records[11:]))
    assert reader.read() == len(records) - 11
    assert reader.raw_series("x").steps.tolist() == [s for s in range(1, 21) if s != 10]
    assert reader.damaged == [(len(b"".join(records[:10])), len(records[10]))]


def test_a_zeroed_stretch_and_two_damaged_spots_are_each_skipped(tmp_path):
    path = _write(tmp_path, [("x", s, float(s)) for s in range(1, 61)])
    records = _records(path)
    starts = np.cumsum([0] + [len(r) for r in records])
    buf = bytearray(path.read_bytes())
    buf[starts[10]:starts[13]] = bytes(starts[13] - starts[10])  # records 10-12 zeroed (a hole in the file)
    buf[starts[50] + 15] ^= 0xFF
    path.write_bytes(bytes(buf))
    log = EventLog(tmp_path)
    log.update()
    assert log.scalars("x").steps.tolist() == [s for s in range(1, 61) if s not in (10, 11, 12, 50)]
    assert log.damaged == [(path, int(starts[10]), int(starts[13] - starts[10])),
                           (path, int(starts[50]), len(records[50]))]
