"""The one count and duration formatter of the trainer's messages, run ids and status.py."""

from bitnet_jax.units import format_count, format_duration


def test_counts_for_run_ids_trim_and_for_columns_keep_their_width():
    assert [format_count(n) for n in (1_966_080_000, 19_200, 95_400_000, 2e12, 1000, 512, 0)] == [
        "1.97B", "19.2K", "95.4M", "2T", "1K", "512", "0"]
    assert format_count(4_800, 19_200, trim=False) == "4.80K"  # in the unit of its whole
    assert format_count(520_000_000, 1_966_080_000, trim=False) == "0.52B"
    assert format_count(None) == "?" and format_count(999, 999) == "999"


def test_durations_round_to_the_unit_people_read():
    assert [format_duration(x) for x in (None, 0.4, 59.4, 90, 3600 * 5 + 60 * 7, 86400 * 2 + 3600 * 3)] == [
        "unknown", "0 s", "59 s", "2 min", "5 h 07 min", "2 d 3 h"]
