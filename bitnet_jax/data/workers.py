"""Tokenizing the loader thread's document pieces (``pieces.py``): in that thread (``data.num_workers: 0``; the tokenizer
backend's own thread pool does the work) or in ``data.num_workers`` spawned processes, always
returning results in submission order."""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

from bitnet_jax.data.pieces import Piece

T = TypeVar("T")
_WORKER_TOKENIZER = None


def _init_worker(tok) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _encode(pieces: Sequence[Piece]) -> list[np.ndarray]:
    return _WORKER_TOKENIZER.encode_pieces(pieces)


class DocumentTokenizer:
    """``map(chunks)`` -> ``(token arrays, payload)`` per chunk of pieces, in order (``encode_pieces``).

    With workers, up to ``2 * num_workers`` chunks are in flight, so the processes stay busy while
    the loader thread packs; with none, the tokenizer's batch call already uses every core (Rust
    threads, GIL released).
    """

    def __init__(self, tok, num_workers: int = 0):
        self.tok = tok
        self.num_workers = num_workers
        self._pool = None
        if num_workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent runs JAX and Rust thread pools that must not be forked
            self._pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(tok,))

    def map(self, chunks: Iterable[tuple[Sequence[Piece], T]]) -> Iterator[tuple[list[np.ndarray], T]]:
        if self._pool is None:
            for pieces, payload in chunks:
                yield self.tok.encode_pieces(pieces), payload
            return
        pending: deque = deque()
        for pieces, payload in chunks:
            pending.append((self._pool.submit(_encode, list(pieces)), payload))
            if len(pending) >= 2 * self.num_workers:
                future, ready = pending.popleft()
                yield future.result(), ready
        while pending:
            future, ready = pending.popleft()
            yield future.result(), ready

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
