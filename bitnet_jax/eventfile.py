"""Reads TensorBoard event files directly: TFRecord framing, then the ``Event`` protobuf.

Why not tensorboard's ``EventAccumulator``: it parses every record through the protobuf runtime and
samples each tag down to 10,000 points; a 60,000-step run has ~540k scalars. Why not
``tensorboardX.proto.event_pb2``: importing it runs ``tensorboardX/__init__``, which imports torch
when torch is installed (~0.9 s). Instead:

- framing: ``uint64 length, uint32 masked crc32c(length), data, uint32 masked crc32c(data)``. A
  record whose bytes are not all there yet (the writer is appending), or whose header or data CRC
  does not match, ends the read, and the next read starts again at that record. The CRCs matter: a
  file's size can grow before its bytes land (network file systems, preallocation), and a tail of
  zero bytes reads as complete records of length 0 or as zeroed data, which would be consumed and
  lost for good. Both CRCs of all records are checked at once with numpy (``crc32c``). A bad
  record followed by valid ones is damage, not a tail still being written: the reader scans for
  the next offset where a whole record's length and data CRCs match, reads on from there, and
  lists the skipped bytes (``EventFileReader.damaged``).
- the common record, one ``simple_value`` scalar (what ``SummaryWriter.add_scalar`` writes), is
  decoded for all records at once with numpy (exact: the float32 value and float64 wall time are
  reinterpreted, not converted);
- every other record goes through a small protobuf wire-format decoder (``decode_event``) that reads
  the fields a status report needs: scalars (``simple_value`` or a one-element numeric tensor) and
  text (``add_text``), and skips the rest (histograms, images, graphs).

``EventFileReader`` reads one file incrementally (only the bytes appended since the last call);
``EventLog`` merges every event file of a folder (restarts write a new file into the same folder).
"""

from __future__ import annotations

import array
import dataclasses
import functools
import math
import os
import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data
_PAD = 16  # zero bytes after the buffer, so fixed-width gathers never run off its end
_MAX_RECORD = 1 << 30  # a length above this is not a record a summary writer wrote
TEXT_SUFFIX = "/text_summary"  # tensorboardX add_text appends it to the tag
_ZERO_LENGTH_CRC = 0x07980329  # masked crc32c of a length of 0 (8 zero bytes); checked in a test


class DecodeError(ValueError):
    """A record whose bytes are not a valid ``Event`` message."""


# --------------------------------------------------------------------------- framing

def _frame(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> tuple[np.ndarray, int]:
    """Header offsets (int64) of the run of complete, CRC-checked TFRecords that starts at
    ``buf[start]``, and the offset just after the last of them: where an incomplete record, or one
    whose length or data CRC does not match, begins (``_resync`` decides which of the two it is)."""
    n = len(buf) if end is None else end
    unpack = struct.Struct("<QI").unpack_from
    found = array.array("q")
    add = found.append
    pos = start
    while pos + _HEADER <= n:
        length, length_crc = unpack(buf, pos)
        nxt = pos + _HEADER + length + _FOOTER
        if nxt > n or length > _MAX_RECORD:
            break
        if length == 0 and length_crc != _ZERO_LENGTH_CRC:  # zeros, not a record: stop here, not 16 bytes on
            break
        add(pos)
        pos = nxt
    offsets = np.frombuffer(found, np.int64) if found else np.zeros(0, np.int64)
    if len(offsets):
        first_bad = _first_crc_mismatch(buf, offsets)
        if first_bad is not None:
            pos = int(offsets[first_bad])
            offsets = offsets[:first_bad]
    return offsets, pos


def _length_crc_ok(b: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Whether each header's stored CRC matches its length. The CRC depends on the length alone:
    looked up for lengths under 2^16 (all records of a summary writer, in practice), computed for
    the rest."""
    stored = sliding_window_view(b, 4)[starts + 8].copy().view("<u4")[:, 0]
    small = lengths < len(_length_crcs())
    expected = np.empty(len(starts), np.uint32)
    expected[small] = _length_crcs()[lengths[small]]
    if not small.all():
        big = np.flatnonzero(~small)
        expected[big] = masked_crc(crc32c(b, starts[big], np.full(len(big), 8, np.int64)))
    return expected == stored


def _data_crc_ok(b: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    stored = sliding_window_view(b, 4)[starts + _HEADER + lengths].copy().view("<u4")[:, 0]
    return masked_crc(crc32c(b, starts + _HEADER, lengths)) == stored


def _first_crc_mismatch(buf: bytes | bytearray, starts: np.ndarray) -> int | None:
    """Index of the first record (by header offset) whose length or data CRC does not match."""
    b = np.frombuffer(buf, np.uint8)
    lengths = sliding_window_view(b, 8)[starts].copy().view("<u8")[:, 0].astype(np.int64)
    ok = _length_crc_ok(b, starts, lengths) & _data_crc_ok(b, starts, lengths)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else None


_SCAN = 1 << 18  # candidate offsets checked per numpy pass while resynchronising


def _resync(buf: bytes | bytearray, pos: int, end: int) -> int | None:
    """Where the records start again after the unreadable bytes at ``buf[pos]``, or None to wait.

    None when the bytes at ``pos`` may still become a record: a header not all there, or a valid
    header whose data is not all there (the writer is appending). Otherwise the record at ``pos`` is
    damaged if a complete record with a matching length CRC and data CRC starts later in the
    buffer: the first such offset is returned (two 32-bit CRCs matching by chance: 1 in 2^64 per
    offset); zeros (a file whose size grew before its bytes landed) never match, so a zero-filled
    tail still waits."""
    if pos + _HEADER > end:
        return None
    b = np.frombuffer(buf, np.uint8)
    (length,) = struct.unpack_from("<Q", buf, pos)
    incomplete = pos + _HEADER + length + _FOOTER > end
    if incomplete and _length_crc_ok(b, np.array([pos]), np.array([length], np.uint64))[0]:
        return None
    last = end - _HEADER - _FOOTER  # the last offset at which an (empty) record still fits
    for lo in range(pos + 1, last + 1, _SCAN):
        cand = np.arange(lo, min(lo + _SCAN, last + 1), dtype=np.int64)
        lengths = sliding_window_view(b, 8)[cand].copy().view("<u8")[:, 0]
        fits = lengths <= (last - cand).astype(np.uint64)
        cand, lengths = cand[fits], lengths[fits].astype(np.int64)
        keep = _length_crc_ok(b, cand, lengths)
        cand, lengths = cand[keep], lengths[keep]
        hits = cand[_data_crc_ok(b, cand, lengths)] if len(cand) else cand
        if len(hits):
            return int(hits[0])
    return None


# --------------------------------------------------------------------------- CRC32C, vectorised

_CRC_CHUNK = 1024  # bytes; records are cut into chunks this long, whose CRCs are combined


@functools.cache
def _crc_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """CRC32C (Castagnoli, reflected) tables: the byte table, two 16-bit tables that take one
    little-endian 32-bit word per step (slicing-by-4 with 16-bit indices), and four byte tables of
    the linear map "run _CRC_CHUNK zero bytes through the register"."""
    t0 = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t0 = np.where(t0 & 1, (t0 >> 1) ^ np.uint32(0x82F63B78), t0 >> 1).astype(np.uint32)
    t = [t0]
    for _ in range(3):  # t[k][v]: byte v followed by k zero bytes
        t.append((t[-1] >> 8) ^ t0[t[-1] & 0xFF])
    i = np.arange(1 << 16)
    lo = t[3][i & 0xFF] ^ t[2][i >> 8]  # the word's first two bytes
    hi = t[1][i & 0xFF] ^ t[0][i >> 8]  # its last two
    x = np.uint32(1) << np.arange(32, dtype=np.uint32)  # each register bit, through a chunk of zeros
    for _ in range(_CRC_CHUNK // 4):
        x = lo[x & 0xFFFF] ^ hi[x >> 16]
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1 == 1
    shift = tuple(np.bitwise_xor.reduce(np.where(bits, x[8 * k:8 * k + 8], np.uint32(0)), axis=1)
                  for k in range(4))
    return t0, lo, hi, shift


@functools.cache
def _length_crcs() -> np.ndarray:
    """The masked CRC32C of the 8-byte header of each length below 2^16."""
    lengths = np.arange(1 << 16, dtype="<u8")
    return masked_crc(crc32c(lengths.view(np.uint8), np.arange(1 << 16) * 8, np.full(1 << 16, 8)))


def _crc_registers(b: np.ndarray, starts: np.ndarray, lengths: np.ndarray, init: np.ndarray) -> np.ndarray:
    """The CRC32C register after running each ``b[start:start + length]`` through it from ``init``
    (no final inversion). One numpy step per 32-bit word position across all ranges at once: the
    ranges are grouped by start address mod 4 (so each group reads aligned words of one view) and
    sorted longest first (the ranges still going are a prefix)."""
    t0, lo, hi, _ = _crc_tables()
    crc = init.astype(np.uint32, copy=True)
    words = lengths >> 2
    for a in range(4):
        rows = np.flatnonzero((starts & 3) == a)
        if not len(rows):
            continue
        rows = rows[np.argsort(-words[rows], kind="stable")]
        w = words[rows]
        if w[0] == 0:
            continue
        view = b[a: a + 4 * ((len(b) - a) // 4)].view("<u4")
        at = (starts[rows] - a) >> 2  # each range's next word in ``view``
        going = np.searchsorted(-w, -np.arange(int(w[0])), side="left")  # ranges with > k words
        c = crc[rows]
        for m in going.tolist():
            x = c[:m] ^ view[at[:m]]
            c[:m] = lo[x & 0xFFFF] ^ hi[x >> 16]
            at[:m] += 1
        crc[rows] = c
    tail = starts + (words << 2)
    for i in range(3):  # the last 0-3 bytes
        rows = np.flatnonzero((lengths & 3) > i)
        if len(rows):
            c = crc[rows]
            crc[rows] = t0[(c ^ b[tail[rows] + i]) & 0xFF] ^ (c >> 8)
    return crc


def crc32c(b: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC32C of every ``b[start:start + length]`` (uint8 ``b``), as uint32; e.g.
    ``crc32c(np.frombuffer(b"123456789", np.uint8), [0], [9]) == [0xE3069283]``.

    Long ranges are cut into chunks, the first ``length mod _CRC_CHUNK`` bytes long (1 to
    _CRC_CHUNK) and the rest _CRC_CHUNK long, so the word loop runs at most _CRC_CHUNK / 4 steps; the
    register is linear, so running A then B from ``init`` is ``shift(reg(A), len B) ^ reg(B from 0)``,
    and the chunks are joined with the one shift table of _CRC_CHUNK zero bytes."""
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    full = np.uint32(0xFFFFFFFF)
    chunks = np.maximum((lengths + _CRC_CHUNK - 1) // _CRC_CHUNK, 1)
    if len(chunks) == 0 or chunks.max() == 1:
        return ~_crc_registers(b, starts, lengths, np.full(len(starts), full))
    _, _, _, shift = _crc_tables()
    first_len = lengths - _CRC_CHUNK * (chunks - 1)
    first = np.cumsum(chunks) - chunks  # each range's first chunk
    rec = np.repeat(np.arange(len(starts)), chunks)
    j = np.arange(len(rec)) - first[rec]  # chunk index within its range
    c_start = np.where(j == 0, starts[rec], starts[rec] + first_len[rec] + _CRC_CHUNK * (j - 1))
    c_len = np.where(j == 0, first_len[rec], _CRC_CHUNK)
    regs = _crc_registers(b, c_start, c_len, np.where(j == 0, full, np.uint32(0)))
    order = np.argsort(-chunks, kind="stable")
    n_chunks = chunks[order]
    reg = regs[first[order]]
    for k in range(1, int(n_chunks[0])):
        m = int(np.searchsorted(-n_chunks, -k, side="left"))
        r = reg[:m]
        reg[:m] = (shift[0][r & 0xFF] ^ shift[1][(r >> 8) & 0xFF] ^ shift[2][(r >> 16) & 0xFF]
                   ^ shift[3][r >> 24] ^ regs[first[order[:m]] + k])
    out = np.empty(len(starts), np.uint32)
    out[order] = ~reg
    return out


def masked_crc(crc: np.ndarray) -> np.ndarray:
    """TFRecord's masking of a CRC32C: rotate right by 15 bits, add 0xa282ead8 (mod 2^32)."""
    crc = np.asarray(crc, np.uint32)
    return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)


# --------------------------------------------------------------------------- protobuf wire decoding

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint longer than 10 bytes")


def _fields(buf, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yields ``(field_number, wire_type, a, b)``: a varint's value (``a``), or a fixed or
    length-delimited field's byte range ``[a, b)``."""
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos
            continue
        if wire == 1:
            a, pos = pos, pos + 8
        elif wire == 2:
            length, a = _varint(buf, pos)
            pos = a + length
        elif wire == 5:
            a, pos = pos, pos + 4
        else:
            raise DecodeError(f"unsupported wire type {wire} (field {number})")
        if pos > end:
            raise DecodeError(f"field {number} runs past the end of its message")
        yield number, wire, a, pos


def _unpack_packed(buf, a: int, b: int, wire: int, fmt: str) -> list:
    """A repeated numeric field, packed (wire type 2) or as one element."""
    if wire == 2:
        if fmt in ("<f", "<d"):
            size = struct.calcsize(fmt)
            return list(struct.unpack_from(f"<{(b - a) // size}{fmt[1]}", buf, a))
        out, pos = [], a
        while pos < b:
            value, pos = _varint(buf, pos)
            out.append(value)
        return out
    if wire == 0:
        return [a]
    return [struct.unpack_from(fmt, buf, a)[0]]


_DT_FLOAT, _DT_DOUBLE, _DT_INT32, _DT_STRING, _DT_INT64, _DT_BOOL, _DT_HALF = 1, 2, 3, 7, 9, 10, 19
_CONTENT_FORMATS = {_DT_FLOAT: "<f", _DT_DOUBLE: "<d", _DT_INT32: "<i", _DT_INT64: "<q", _DT_HALF: "<e"}


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_tensor(buf, pos: int, end: int) -> tuple[float | None, str | None]:
    """A TensorProto as ``(scalar, text)``: the value of a one-element numeric tensor, or the
    strings of a string tensor (joined by newlines); ``None`` for what it is not."""
    dtype = 0
    content = None
    strings: list[bytes] = []
    numbers: list[float] = []
    for number, wire, a, b in _fields(buf, pos, end):
        if number == 1:
            dtype = a
        elif number == 4:
            content = bytes(buf[a:b])
        elif number == 8:
            strings.append(bytes(buf[a:b]))
        elif number == 5:
            numbers += _unpack_packed(buf, a, b, wire, "<f")
        elif number == 6:
            numbers += _unpack_packed(buf, a, b, wire, "<d")
        elif number in (7, 10, 11) and wire in (0, 2):  # int_val, int64_val, bool_val
            numbers += [_signed64(v) for v in _unpack_packed(buf, a, b, wire, "varint")]
        elif number == 13 and wire in (0, 2):  # half_val: float16 bit patterns held in int32s
            numbers += [struct.unpack("<e", struct.pack("<H", v & 0xFFFF))[0]
                        for v in _unpack_packed(buf, a, b, wire, "varint")]
    if dtype == _DT_STRING or strings:
        return None, "\n".join(s.decode("utf-8", "replace") for s in strings)
    if content is not None and dtype in _CONTENT_FORMATS:
        fmt = _CONTENT_FORMATS[dtype]
        if len(content) == struct.calcsize(fmt):
            return float(struct.unpack(fmt, content)[0]), None
        return None, None
    if len(numbers) == 1:
        return float(numbers[0]), None
    return None, None


def _plugin_name(buf, pos: int, end: int) -> str:
    for number, _, a, b in _fields(buf, pos, end):
        if number == 1:  # plugin_data
            for n2, _, a2, b2 in _fields(buf, a, b):
                if n2 == 1:
                    return bytes(buf[a2:b2]).decode("utf-8", "replace")
    return ""


class Value(NamedTuple):
    """One summary value: ``scalar`` or ``text`` is set, or neither (histogram, image, ...)."""

    tag: str
    scalar: float | None = None
    text: str | None = None


class Event(NamedTuple):
    wall_time: float
    step: int
    values: tuple[Value, ...] = ()
    file_version: str | None = None


def decode_event(data: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None) -> Event:
    """Decodes the serialized ``Event`` in ``data[pos:end]`` (the fields a status report reads).

    Text tags lose tensorboardX's ``/text_summary`` suffix: ``add_text("a/b", ...)`` reads as ``a/b``.
    """
    end = len(data) if end is None else end
    wall_time, step, file_version = 0.0, 0, None
    values: list[Value] = []
    try:
        for number, wire, a, b in _fields(data, pos, end):
            if number == 1 and wire == 1:
                (wall_time,) = struct.unpack_from("<d", data, a)
            elif number == 2 and wire == 0:
                step = _signed64(a)
            elif number == 3 and wire == 2:
                file_version = bytes(data[a:b]).decode("utf-8", "replace")
            elif number == 5 and wire == 2:  # summary
                for n2, w2, va, vb in _fields(data, a, b):
                    if n2 == 1 and w2 == 2:
                        values.append(_decode_value(data, va, vb))
    except (IndexError, struct.error) as e:
        raise DecodeError(f"truncated event message: {e}") from None
    return Event(wall_time, step, tuple(values), file_version)


def _decode_value(buf, pos: int, end: int) -> Value:
    tag = ""
    scalar = text = None
    tensor = None
    plugin = ""
    for number, wire, a, b in _fields(buf, pos, end):
        if number == 1:
            tag = bytes(buf[a:b]).decode("utf-8", "replace")
        elif number == 2 and wire == 5:
            (scalar,) = struct.unpack_from("<f", buf, a)
        elif number == 8:
            tensor = (a, b)
        elif number == 9:
            plugin = _plugin_name(buf, a, b)
    if tensor is not None and scalar is None and plugin in ("", "scalars", "text"):
        scalar, text = _decode_tensor(buf, *tensor)
        if plugin == "text" or text is not None:
            scalar = None
            text = text or ""
    if text is not None and tag.endswith(TEXT_SUFFIX):
        tag = tag[: -len(TEXT_SUFFIX)]
    return Value(tag, scalar, text)


# --------------------------------------------------------------------------- vectorised scalars

def _decode_simple_scalars(b: np.ndarray, data_start: np.ndarray, data_end: np.ndarray):
    """Decodes, all at once, the records that are exactly ``Event{wall_time, step, summary{value{tag,
    simple_value}}}`` with a positive step (``SummaryWriter.add_scalar``'s record).

    ``b`` is the buffer as uint8 with ``_PAD`` zero bytes at the end. Returns ``(ok, steps, values,
    walls, tag_start, tag_len)``; rows where ``ok`` is False are left to ``decode_event``.
    """
    n = len(data_start)
    d = data_start
    # Event: 0x09 wall_time(8 bytes) 0x10 step(varint) 0x2a len Summary
    ok = (b[d] == 0x09) & (b[d + 9] == 0x10)
    win = sliding_window_view(b, 10)[np.minimum(d + 10, len(b) - 10)]
    cont = win >= 0x80
    vlen = np.argmin(cont, axis=1) + 1
    ok &= ~cont.all(axis=1)
    steps = np.zeros(n, np.uint64)
    for k in range(int(vlen[ok].max(initial=1))):
        steps |= np.where(k < vlen, (win[:, k] & 0x7F).astype(np.uint64) << np.uint64(7 * k), np.uint64(0))
    steps = steps.view(np.int64)
    p = np.minimum(d + 10 + vlen, len(b) - _PAD)
    # Summary: 0x0a len Value; Value: 0x0a taglen tag 0x15 float32
    head = sliding_window_view(b, 6)[p]
    tag_len = head[:, 5].astype(np.int64)
    s = np.minimum(p + 6 + tag_len, len(b) - 5)
    ok &= ((head[:, 0] == 0x2A) & (head[:, 2] == 0x0A) & (head[:, 4] == 0x0A)
           & (head[:, 1] < 0x80) & (head[:, 3] < 0x80) & (head[:, 5] < 0x80))
    ok &= (b[s] == 0x15) & (s + 5 == data_end)
    ok &= (p + 2 + head[:, 1] == data_end) & (p + 4 + head[:, 3] == data_end) & (steps > 0)
    idx = np.flatnonzero(ok)
    values = sliding_window_view(b, 4)[s[idx] + 1].copy().view("<f4")[:, 0].astype(np.float64)
    walls = sliding_window_view(b, 8)[d[idx] + 1].copy().view("<f8")[:, 0]
    return ok, steps[idx], values, walls, p[idx] + 6, tag_len[idx]


def _group_by_tag(b: np.ndarray, tag_start: np.ndarray, tag_len: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices (in input order) of each distinct tag, the tag bytes compared exactly."""
    groups: dict[str, np.ndarray] = {}
    for length in np.unique(tag_len):
        rows = np.flatnonzero(tag_len == length)
        length = int(length)
        mat = sliding_window_view(b, length)[tag_start[rows]]
        width = -(-length // 8) * 8
        if width != length:
            mat = np.pad(mat, ((0, 0), (0, width - length)))
        words = np.ascontiguousarray(mat).view("<u8")
        h = np.zeros(len(rows), np.uint64)
        for j in range(words.shape[1]):  # a cheap hash to sort by; equality is checked below
            h = h * np.uint64(0x9E3779B97F4A7C15) ^ words[:, j]
        order = np.argsort(h, kind="stable")
        hs = h[order]
        cuts = np.flatnonzero(hs[1:] != hs[:-1]) + 1
        for part in np.split(order, cuts):
            first = mat[part[0]]
            same = (mat[part] == first).all(axis=1)
            if not same.all():  # a hash collision: split exactly, rarely taken
                for sub in np.unique(mat[part], axis=0):
                    sel = part[(mat[part] == sub).all(axis=1)]
                    groups[bytes(sub[:length]).decode("utf-8", "replace")] = rows[sel]
                continue
            groups[bytes(first[:length]).decode("utf-8", "replace")] = rows[part]
    return groups


# --------------------------------------------------------------------------- one file, incrementally

@dataclasses.dataclass
class Series:
    """One scalar tag: ``steps`` (int64, increasing, unique), ``values`` (float64) and
    ``wall_times`` (float64, seconds since the epoch), aligned."""

    steps: np.ndarray
    values: np.ndarray
    wall_times: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last_step(self) -> int:
        return int(self.steps[-1])

    @property
    def last_value(self) -> float:
        return float(self.values[-1])

    def at(self, step: int) -> float | None:
        i = int(np.searchsorted(self.steps, step))
        return float(self.values[i]) if i < len(self.steps) and self.steps[i] == step else None


class TextEvent(NamedTuple):
    step: int
    wall_time: float
    text: str


class EventFileReader:
    """Reads one event file incrementally: each ``read()`` decodes only the bytes appended since the
    previous one, and leaves an incomplete last record for the next call. Damaged bytes in the
    middle (records that will never become valid, followed by valid ones) are skipped and listed in
    ``damaged`` as ``(file offset, bytes skipped)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reset()

    def _reset(self) -> None:
        self.offset = 0  # where the next read starts: the first record not yet decoded
        self.records = 0
        self.first_wall_time: float | None = None  # the file_version event's: orders restarts
        self.last_wall_time: float | None = None
        self._chunks: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._series: dict[str, Series] = {}
        self.texts: dict[str, list[TextEvent]] = {}
        self.damaged: list[tuple[int, int]] = []

    def read(self) -> int:
        """Reads what was appended since the last call; returns the number of new records."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return 0
        if size < self.offset:  # rewritten from scratch (a writer reopened the same name)
            self._reset()
        if size - self.offset < _HEADER:
            return 0
        buf = bytearray(size - self.offset + _PAD)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                got = f.readinto(memoryview(buf)[: size - self.offset])
        except FileNotFoundError:  # removed since the stat
            return 0
        new, pos = 0, 0
        while True:
            starts, stop = _frame(buf, pos, got)
            if len(starts):
                self._decode(buf, starts, stop)
            new += len(starts)
            pos = _resync(buf, stop, got) if stop < got else None
            if pos is None:
                break
            self.damaged.append((self.offset + stop, pos - stop))
        self.offset += stop
        self.records += new
        return new

    def _decode(self, buf: bytearray, starts: np.ndarray, stop: int) -> None:
        b = np.frombuffer(buf, np.uint8)
        data_start = starts + _HEADER
        data_end = np.append(starts[1:], stop) - _FOOTER
        ok, steps, values, walls, tag_start, tag_len = _decode_simple_scalars(b, data_start, data_end)
        fast_records = np.flatnonzero(ok)
        wall_max = float(walls.max()) if len(walls) else -math.inf
        fast = _group_by_tag(b, tag_start, tag_len)
        # Everything else (file_version, text, step-0 scalars, histograms, ...) one by one.
        slow: dict[str, list[tuple[int, int, float, float]]] = {}
        first_slow = None
        for i in np.flatnonzero(~ok).tolist():
            try:
                ev = decode_event(buf, int(data_start[i]), int(data_end[i]))
            except DecodeError:  # a framed record that is no Event message: nothing a report reads
                continue
            if first_slow is None:
                first_slow = (i, ev.wall_time)
            wall_max = max(wall_max, ev.wall_time)
            for v in ev.values:
                if v.scalar is not None:
                    slow.setdefault(v.tag, []).append((i, ev.step, v.scalar, ev.wall_time))
                elif v.text is not None:
                    self.texts.setdefault(v.tag, []).append(TextEvent(ev.step, ev.wall_time, v.text))
        for tag in list(fast) + [t for t in slow if t not in fast]:
            rows = fast.get(tag)
            part = (steps[rows], values[rows], walls[rows]) if rows is not None else None
            if tag in slow:
                rec, s_, v_, w_ = (np.asarray(c) for c in zip(*slow[tag]))
                extra = (s_.astype(np.int64), v_.astype(np.float64), w_.astype(np.float64))
                if part is None:
                    part = extra
                else:  # both kinds of record for one tag: back into file order
                    order = np.argsort(np.concatenate([fast_records[rows], rec]), kind="stable")
                    part = tuple(np.concatenate([a, c])[order] for a, c in zip(part, extra))
            self._chunks.setdefault(tag, []).append(part)
            self._series.pop(tag, None)
        if self.first_wall_time is None:
            if ok[0]:
                self.first_wall_time = float(struct.unpack_from("<d", buf, int(data_start[0]) + 1)[0])
            elif first_slow is not None and first_slow[0] == 0:
                self.first_wall_time = first_slow[1]
        if wall_max > -math.inf and (self.last_wall_time is None or wall_max > self.last_wall_time):
            self.last_wall_time = wall_max

    def tags(self) -> list[str]:
        return list(self._chunks)

    def raw_series(self, tag: str) -> Series | None:
        """The tag's scalars in file order (repeats included, not sorted)."""
        if tag not in self._chunks:
            return None
        if tag not in self._series:
            parts = self._chunks[tag]
            if len(parts) > 1:
                parts = [tuple(np.concatenate(c) for c in zip(*parts))]
                self._chunks[tag] = parts
            self._series[tag] = Series(*parts[0])
        return self._series[tag]

    def min_train_step(self, prefix: str = "train/") -> int | None:
        """The first training step this file logged: where a restart resumed."""
        found = [int(s.steps.min()) for t in self._chunks if t.startswith(prefix)
                 for s in [self.raw_series(t)] if len(s)]
        return min(found) if found else None


# --------------------------------------------------------------------------- a folder of files

def is_event_file(path: Path) -> bool:
    return path.is_file() and "tfevents" in path.name


class EventLog:
    """Every event file in a folder, merged into one view, read incrementally by ``update()``.

    Files are ordered by the wall time of their first event (a resumed run opens a new file).
    Merging: for a repeated (tag, step), the newest file wins; and a newer file that starts
    training at step s discards what older files logged at steps >= s (the abandoned stretch between
    the checkpoint a restart resumed from and the crash), as TensorBoard does with orphaned data.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.readers: dict[Path, EventFileReader] = {}
        self._merged: dict[str, Series] = {}
        self._merged_texts: dict[str, list[TextEvent]] | None = None
        self._order: list[EventFileReader] = []
        self._cut: list[float] = []

    def update(self) -> int:
        """Reads new files and the new bytes of known ones; returns the number of new records."""
        if self.folder.is_dir():
            for path in sorted(self.folder.glob("*tfevents*")):
                if path not in self.readers and path.is_file():
                    self.readers[path] = EventFileReader(path)
        new = sum(r.read() for r in self.readers.values())
        if new or len(self._order) != len(self.readers):
            self._merged.clear()
            self._merged_texts = None
            self._order = sorted(
                self.readers.values(),
                key=lambda r: (r.first_wall_time if r.first_wall_time is not None else math.inf, r.path.name),
            )
            self._cut = self._cutoffs()
        return new

    @property
    def files(self) -> list[Path]:
        """Event files, oldest first."""
        return [r.path for r in self._order]

    @property
    def records(self) -> int:
        return sum(r.records for r in self.readers.values())

    @property
    def last_wall_time(self) -> float | None:
        times = [r.last_wall_time for r in self.readers.values() if r.last_wall_time is not None]
        return max(times) if times else None

    @property
    def damaged(self) -> list[tuple[Path, int, int]]:
        """``(file, offset, bytes skipped)`` of every damaged stretch read past, oldest file first."""
        return [(r.path, offset, size) for r in self._order for offset, size in r.damaged]

    @property
    def last_modified(self) -> float | None:
        times = []
        for path in self.readers:
            try:
                times.append(os.stat(path).st_mtime)
            except FileNotFoundError:
                pass
        return max(times) if times else None

    def _cutoffs(self) -> list[float]:
        """For each file (oldest first), the step from which newer files supersede it."""
        cut = math.inf
        out = []
        for r in reversed(self._order):
            out.append(cut)
            start = r.min_train_step()
            if start is not None:
                cut = min(cut, start)
        return out[::-1]

    def tags(self) -> list[str]:
        seen = dict.fromkeys(t for r in self._order for t in r.tags())
        return list(seen)

    def scalars(self, tag: str) -> Series | None:
        """The merged scalars of ``tag``, sorted by step, one value a step; None if never logged."""
        if tag in self._merged:
            return self._merged[tag]
        parts = []
        for r, cut in zip(self._order, self._cut):
            s = r.raw_series(tag)
            if s is None or not len(s):
                continue
            if cut < math.inf:
                keep = s.steps < cut
                s = Series(s.steps[keep], s.values[keep], s.wall_times[keep])
            parts.append(s)
        if not parts:
            return None
        steps = np.concatenate([p.steps for p in parts])
        values = np.concatenate([p.values for p in parts])
        walls = np.concatenate([p.wall_times for p in parts])
        # Stable sort keeps file order within a step; the last of each run of equal steps wins.
        order = np.argsort(steps, kind="stable")
        steps = steps[order]
        last = np.ones(len(steps), bool)
        last[:-1] = steps[1:] != steps[:-1]
        keep = order[last]
        series = Series(steps[last], values[keep], walls[keep])
        self._merged[tag] = series
        return series

    def texts(self) -> dict[str, list[TextEvent]]:
        """Text events by tag, merged like scalars, sorted by step."""
        if self._merged_texts is None:
            merged: dict[str, dict[int, TextEvent]] = {}
            for r, cut in zip(self._order, self._cut):
                for tag, events in r.texts.items():
                    slot = merged.setdefault(tag, {})
                    for ev in events:
                        if ev.step < cut:
                            slot[ev.step] = ev
            self._merged_texts = {t: [d[s] for s in sorted(d)] for t, d in merged.items()}
        return self._merged_texts
