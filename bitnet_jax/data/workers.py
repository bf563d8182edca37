"""Tokenizing the loader thread's documents: in that thread (``data.num_workers: 0``; the tokenizer
backend's own thread pool does the work) or in ``data.num_workers`` spawned processes, always
returning results in submission order."""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
_WORKER_TOKENIZER = None


def _init_worker(tok) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _encode(texts: Sequence[str]) -> list[np.ndarray]:
    return _WORKER_TOKENIZER.encode_documents(texts)


class DocumentTokenizer:
    """``map(chunks)`` -> ``(token arrays, payload)`` per chunk of texts, in order.

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

    def map(self, chunks: Iterable[tuple[Sequence[str], T]]) -> Iterator[tuple[list[np.ndarray], T]]:
        if self._pool is None:
            for texts, payload in chunks:
                yield self.tok.encode_documents(texts), payload
            return
        pending: deque = deque()
        for texts, payload in chunks:
            pending.append((self._pool.submit(_encode, list(texts)), payload))
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
