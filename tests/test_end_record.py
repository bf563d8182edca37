"""end.json: written atomically, read back strictly, stale once something newer was logged."""

from __future__ import annotations

import json

import pytest

from bitnet_jax.end_record import END_FILE, EndRecord, EndRecordError, read_end_record, write_end_record


def test_round_trip_and_nothing_else_left_in_the_folder(tmp_path):
    assert read_end_record(tmp_path) is None
    path = write_end_record(tmp_path, "halted", 412, "non-finite loss", 3, now=1_732_700_000.5)
    assert [p.name for p in tmp_path.iterdir()] == [END_FILE] and path == tmp_path / END_FILE
    assert json.loads(path.read_text()) == {"state": "halted", "step": 412, "reason": "non-finite loss",
                                            "exit_code": 3, "time": 1_732_700_000.5}
    assert read_end_record(tmp_path) == EndRecord("halted", 412, "non-finite loss", 3, 1_732_700_000.5)
    write_end_record(tmp_path, "failed", None, "bad data file", 2, now=1_732_700_100.0)  # replaces it
    assert read_end_record(tmp_path) == EndRecord("failed", None, "bad data file", 2, 1_732_700_100.0)


def test_a_record_is_current_until_something_newer_is_logged():
    record = EndRecord("stopped", 100, "SIGTERM", 0, 1000.0)
    assert record.is_current(None) and record.is_current(999.5) and record.is_current(1000.0)
    assert not record.is_current(1000.25)


@pytest.mark.parametrize("state, step", [("crashed", 1), ("halted", -1), ("halted", 1.5), ("halted", True)])
def test_the_writer_refuses_what_readers_would_not_understand(tmp_path, state, step):
    with pytest.raises(ValueError):
        write_end_record(tmp_path, state, step, "", 1)
    assert not (tmp_path / END_FILE).exists()


@pytest.mark.parametrize("content, message", [
    (b'{"state": "halted", "step": ', "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"state": "exploded", "step": 1, "exit_code": 1, "time": 5}', "unknown state"),
    (b'{"state": "halted", "step": 1, "exit_code": 3}', "time is not a number"),
    (b'{"state": "halted", "step": "1", "exit_code": 3, "time": 5}', "step is not an integer"),
    (b'\xff\xfe', "could not be read"),
])
def test_a_damaged_record_is_one_clear_error(tmp_path, content, message):
    (tmp_path / END_FILE).write_bytes(content)
    with pytest.raises(EndRecordError, match=message):
        read_end_record(tmp_path)
