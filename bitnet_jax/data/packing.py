"""Packing: tokenized documents -> fixed ``[rows, seq_len + 1]`` int32 training rows.

The contract (the same for training and evaluation batches):

1. Each document becomes ``[BOS] + ids(text) + [EOS]`` (BOS/EOS only where the tokenizer has them).
2. Documents are concatenated in stream order into one token stream; nothing is padded, nothing
   is dropped (except a finite stream's tail too short for a whole batch).
3. Row ``k`` of the stream is ``stream[k * seq_len : k * seq_len + seq_len + 1]``: consecutive rows
   overlap by exactly one token, the last token of a row is the first of the next. The model reads
   ``row[:-1]`` and predicts ``row[1:]``, so every token after the first is a target exactly once.
4. A batch is ``rows`` consecutive rows; the next batch starts where the previous ended.

A row may start mid-document and span several documents; attention is not masked at document
boundaries (the BOS/EOS tokens mark them).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np


def rows_from_stream(tokens: np.ndarray, seq_len: int, rows: int) -> np.ndarray:
    """The first ``rows`` packed rows of a flat token stream: int32 ``[rows, seq_len + 1]``.

    ``tokens`` needs at least ``rows * seq_len + 1`` ids.
    """
    need = rows * seq_len + 1
    if tokens.shape[0] < need:
        raise ValueError(f"{rows} rows of {seq_len}+1 tokens need {need} tokens, got {tokens.shape[0]}")
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:need], seq_len + 1)
    return np.ascontiguousarray(windows[::seq_len][:rows], dtype=np.int32)


class Packer:
    """A token buffer over documents that cuts batches by the contract above.

    It remembers, for the document (or the piece of a long document, ``pieces.py``) the next row
    starts in, the position it was pushed with and how many of its tokens are already used:
    ``head()``. That pair is all a resumed loader needs to rebuild the buffer (re-reading and
    re-tokenizing that one document or piece), so the leftover tokens never have to be stored.
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._docs: deque[tuple[np.ndarray, Any]] = deque()  # (ids, position) of unfinished documents
        self._offset = 0  # tokens of _docs[0] already consumed
        self.available = 0  # tokens buffered and not consumed

    def push(self, ids: np.ndarray, position: Any) -> None:
        if ids.shape[0]:
            self._docs.append((ids, position))
            self.available += ids.shape[0]

    def skip(self, n: int) -> None:
        """Drops the first ``n`` tokens of the head document (resuming mid-document)."""
        head_len = self._docs[0][0].shape[0] if self._docs else 0
        if not 0 <= n < max(head_len, 1):
            raise ValueError(f"cannot skip {n} tokens of a {head_len}-token document; the loader state does "
                             "not match this data or tokenizer")
        self._offset += n
        self.available -= n

    def can_take(self, rows: int) -> bool:
        return self.available >= rows * self.seq_len + 1

    def take(self, rows: int) -> np.ndarray:
        """The next ``rows`` rows, int32 ``[rows, seq_len + 1]``; consumes ``rows * seq_len`` tokens."""
        need = rows * self.seq_len + 1
        pieces, got = [], 0
        for i, (ids, _) in enumerate(self._docs):
            start = self._offset if i == 0 else 0
            piece = ids[start:start + need - got]
            pieces.append(piece)
            got += piece.shape[0]
            if got == need:
                break
        batch = rows_from_stream(np.concatenate(pieces), self.seq_len, rows)
        self._consume(rows * self.seq_len)
        return batch

    def _consume(self, n: int) -> None:
        self.available -= n
        n += self._offset
        while n >= self._docs[0][0].shape[0]:  # the shared last token keeps the head non-empty
            n -= self._docs.popleft()[0].shape[0]
        self._offset = n

    def head(self) -> tuple[Any, int]:
        """(position of the document the next row starts in, tokens of it already consumed)."""
        return self._docs[0][1], self._offset


def stream_tokens(docs: Sequence[np.ndarray], n: int) -> np.ndarray:
    """The first ``n`` tokens of the concatenated documents (fewer if there are not that many)."""
    out, got = [], 0
    for ids in docs:
        out.append(ids[: n - got])
        got += out[-1].shape[0]
        if got >= n:
            break
    return np.concatenate(out) if out else np.zeros(0, np.int32)
