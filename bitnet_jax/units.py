"""Numbers and durations for people: ``1.97B`` tokens, ``1 h 04 min``. Shared by the trainer's
messages and status.py (no imports beyond the standard library)."""

from __future__ import annotations

_SCALES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def format_count(n: float | None, unit_of: float | None = None, *, trim: bool = True) -> str:
    """A count with a K/M/B/T suffix and two decimals: ``1_966_080_000 -> '1.97B'``.

    ``unit_of`` picks the suffix from another number, so that a part and its whole read in one
    unit (``0.52B / 1.97B``, not ``520.00M / 1.97B``). ``trim`` drops trailing zeros (``'19.2K'``,
    for run ids); without it the width stays fixed (``'19.20K'``, for columns). Below 1,000 the count
    is written out in full; None is ``'?'``."""
    if n is None:
        return "?"
    scale = n if unit_of is None else unit_of
    for size, suffix in _SCALES:
        if scale >= size:
            text = f"{n / size:.2f}"
            return (text.rstrip("0").rstrip(".") if trim else text) + suffix
    return f"{int(n):,}"


def format_duration(seconds: float | None) -> str:
    """``4 s``, ``59 min``, ``5 h 07 min``, ``2 d 3 h``: rounded to the unit people read at that size."""
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m = round(seconds / 60)
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"
