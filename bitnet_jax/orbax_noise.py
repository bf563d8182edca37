"""What a read of a damaged checkpoint prints: one warning line, with Orbax's own noise kept in a file.

A read that fails part-way leaves Orbax's pending reads to fail on their own: each prints
``Exception ignored in: <coroutine ...> ... Encountered error while reading array index`` with a page of
TensorStore spec (through ``sys.unraisablehook``, often only when the coroutine is garbage collected,
after the read has returned), ``Event loop is closed`` and absl / asyncio log records, even when the
run then goes on from an older step. ``captured(log_path)`` routes all of that, during a read and for
the coroutines that read left behind, to ``RUN_DIR/orbax_errors.log`` (nothing is lost; the
console keeps one line per damaged step).

``CheckpointWarning`` is the category of the warnings checkpoint reads give; it prints as one line,
``warning: <message>``, without the source line Python's default format adds.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

LOG_NAME = "orbax_errors.log"
_LOGGERS = ("absl", "asyncio", "orbax", "tensorstore")
_lock = threading.Lock()


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or moved aside; printed as one line."""


_default_format = warnings.formatwarning


def _format(message, category, filename, lineno, line=None):
    if isinstance(category, type) and issubclass(category, CheckpointWarning):
        return f"warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


warnings.formatwarning = _format


def orbax():
    """``orbax.checkpoint``, imported on first use (a second of start-up that most imports of the
    checkpoint modules skip), with its INFO logging kept off the console."""
    import orbax.checkpoint as ocp

    # Orbax logs every save at INFO through absl; keep the console for the progress bar.
    # ERROR: it also warns that item folders lack a _CHECKPOINT_METADATA file, which is by design.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


def _is_orbax_leftover(unraisable) -> bool:
    """An unraisable error of Orbax's or TensorStore's (a failed read's coroutine, its event loop)."""
    obj, exc = unraisable.object, unraisable.exc_value
    where = " ".join(str(getattr(obj, attr, "")) for attr in ("__qualname__", "__module__"))
    text = f"{where} {obj!r} {exc!r}"
    if exc is not None and exc.__traceback__ is not None:
        text += " " + " ".join(f.filename for f in traceback.extract_tb(exc.__traceback__))
    return any(word in text for word in ("orbax", "tensorstore", "Event loop is closed",
                                         "Encountered error while reading array"))


class _Capture:
    def __init__(self, log_path: Path):
        self.log_path = log_path

    def write(self, text: str) -> None:
        try:
            with _lock, open(self.log_path, "a") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        except OSError:
            pass  # no space to keep the noise: losing it loses nothing of the run

    def flush(self) -> None:  # (a logging.StreamHandler's stream)
        pass

    def unraisable(self, unraisable) -> None:
        exc = unraisable.exc_value
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__) if exc is not None else []
        self.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {unraisable.err_msg or 'Exception ignored in'}: "
                   f"{unraisable.object!r}\n{''.join(lines)}")


_leftover_capture: _Capture | None = None  # routes Orbax's late unraisables after a captured read


def _route_leftovers(unraisable) -> None:
    capture = _leftover_capture
    if capture is not None and _is_orbax_leftover(unraisable):
        capture.unraisable(unraisable)
    else:
        sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def captured(log_path: str | Path):
    """During the block, Orbax's log records and every unraisable error go to ``log_path`` (appended,
    created on first use) instead of the console; after it, the unraisable errors of Orbax's and
    TensorStore's that the block's failed reads leave behind still do."""
    global _leftover_capture
    capture = _Capture(Path(log_path))
    handler = logging.StreamHandler(capture)  # a file opened per record: no file unless there is noise
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    previous_hook, sys.unraisablehook = sys.unraisablehook, capture.unraisable
    try:
        yield capture
    finally:
        try:
            gc.collect()  # the failed read's coroutines: collected (and reported) into the log now
        finally:
            for lg, (handlers, propagate) in zip(loggers, saved):
                lg.handlers, lg.propagate = handlers, propagate
            _leftover_capture = capture
            default = previous_hook in (sys.__unraisablehook__, _route_leftovers)
            sys.unraisablehook = _route_leftovers if default else previous_hook
