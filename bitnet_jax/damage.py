"""Telling damaged checkpoint files from every other error raised while reading a step.

A step whose files are damaged may give way to an older one (``open_step.open_step``) and is moved
out of the way; any other error (out of memory, a sharding mismatch, a file system that is down for a
moment, a bug) must not cost the checkpoint. Orbax and tensorstore raise both kinds as plain
exceptions, so this module reads their type and status code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# What Orbax 0.12 / tensorstore 0.1 raise for damaged files (found by damaging real steps):
#   a JSON file (state/_METADATA, state/array_metadatas/*, data/ or meta/metadata) truncated or garbled:
#       json.JSONDecodeError;  data/ or meta/metadata deleted: FileNotFoundError
#   state/manifest.ocdbt deleted: ValueError("NOT_FOUND: ... does not exist");  truncated or garbled:
#       ValueError("DATA_LOSS: ... Error decoding local file ...")
#   a b-tree file under state/d/ deleted: ValueError("NOT_FOUND: ..."); truncated: ValueError("OUT_OF_RANGE:
#       ... Requested byte range ... is not valid ..."); garbled: ValueError("DATA_LOSS: ...") or, with no
#       status prefix, ValueError("... Error decoding b-tree node: ZSTD_decompressStream() failed: Data
#       corruption detected ...")
#   an array data file under state/ocdbt.process_*/d/ deleted, emptied or zeroed: Exception("Encountered
#       error while reading array index ...") whose context is ValueError("FAILED_PRECONDITION: ...
#       Truncated Zstd-compressed stream" / "ZSTD_decompressStream() failed: Unknown frame descriptor")
#       or ValueError("OUT_OF_RANGE: ... Requested byte range ... is not valid for value of size N");
#       truncated: the same OUT_OF_RANGE.
# (Bytes flipped inside a compressed array chunk decode without an error: zstd frames carry no checksum
# here; the step's checksum, state_checksum.py, is what finds them.)
# tensorstore reports every failure as a ValueError whose message starts with the absl status code
# (all but INVALID_ARGUMENT, which has none), so the code, and for INVALID_ARGUMENT the decoder's words,
# are the only way to tell damage from e.g. RESOURCE_EXHAUSTED or UNAVAILABLE.
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
_DECODE_FAILURES = ("Error decoding", "ZSTD_decompressStream() failed", "Truncated Zstd-compressed stream",
                    "Data corruption detected")
_OTHER_CODES = ("CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "ABORTED", "UNIMPLEMENTED", "INTERNAL",
                "UNAVAILABLE", "UNAUTHENTICATED")


def damage_reason(error: BaseException, step_dir: str | Path) -> str | None:
    """Why ``error``, raised while reading ``step_dir``, shows that the step's files are damaged; None
    when it does not (then it is someone else's problem and must not cost the checkpoint).

    Looks through Orbax's generic ``Exception`` wrappers to the error they wrap, never past any other
    type: a RuntimeError("RESOURCE_EXHAUSTED ...") stays an out-of-memory error whatever it wraps."""
    if not Path(step_dir).is_dir():
        return None  # the step vanished under us (moved by someone): not damage of its files
    for e in _chain(error):
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            return f"a JSON file is truncated or corrupt: {first_line(e)}"
        if isinstance(e, FileNotFoundError):
            return f"a file is missing: {first_line(e)}"
        if type(e) is ValueError:
            text = str(e)
            code = text.split(":", 1)[0].strip()
            if code in _OTHER_CODES:
                return None
            if code in _DAMAGE_CODES or any(phrase in text for phrase in _DECODE_FAILURES):
                return first_line(e)
            return None
        if type(e) is not Exception:
            return None
    return None


def _chain(error: BaseException):
    """``error``, then the errors it was raised from (``__cause__``, else ``__context__``), at most 8."""
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not x for x in seen) and len(seen) < 8:
        seen.append(e)
        yield e
        e = e.__cause__ or e.__context__


def first_line(e: BaseException) -> str:
    """Tensorstore errors append a page of JSON spec; the first line says what failed."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}"


def failure_cause(error: BaseException) -> str:
    """A failed write in a few words: the operating system's reason (``No space left on device``,
    ``Operation not permitted: PATH``) where the error or one it wraps names one (tensorstore puts it
    in its message as ``os_error_code``), else the error's first line."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code:
            return os.strerror(int(code.group(1)))
    return first_line(error)
