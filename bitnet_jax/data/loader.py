"""The training loader (a prefetching, exactly resumable batch iterator) and the eval batches.

::

    loader = build_train_loader(cfg, tok, process_index, process_count, state=None)
    batch_BxS1 = next(loader)   # int32 [train.batch_size // process_count, train.seq_len + 1]
    state = loader.state_dict() # JSON; the position right after the last batch next() returned
    loader.close()

A background thread reads documents, cuts long ones into pieces (``pieces.py``: the same ids,
bounded memory), tokenizes and packs them (``packing.py``) and keeps up to
``data.prefetch_batches`` batches in a bounded queue, so ``next()`` is a queue ``get``. Each queued
batch carries the state *after* it; ``next()`` records that one, so ``state_dict()`` is exact
however far the thread has run ahead.

The state (plain JSON) holds the position of the document the next row starts in (epoch, the
``datasets`` ``IterableDataset.state_dict()`` just before that document, its index), how many of
its tokens are already used (``skip_tokens``: the leftover buffer, stored as where it starts rather
than its ids), where the piece holding that token starts (``piece``: its first character and the
document's tokens before it), and counters. A loader built with that state re-reads that document,
tokenizes it from that piece on, skips the used tokens and continues with the same batches, bit for
bit. A state without ``piece`` (saved before pieces existed) tokenizes the document from its start.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np

from bitnet_jax.config import Config, ConfigError
from bitnet_jax.data.documents import DocumentStream
from bitnet_jax.data.errors import DataError
from bitnet_jax.data.heldout import HeldOut, heldout_set
from bitnet_jax.data.packing import Packer, rows_from_stream
from bitnet_jax.data.pieces import CALL_CHARS, bounded_batches
from bitnet_jax.data.sources import source_spec
from bitnet_jax.data.workers import DocumentTokenizer

STATE_FORMAT = "bitnet_jax.data.loader/1"
_DOCUMENT_START = {"start_char": 0, "tokens_before": 0}  # where a document's first piece is
_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def rows_per_process(cfg: Config, process_count: int) -> int:
    if process_count < 1 or cfg.train.batch_size % process_count:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
                          f"processes ({process_count}): each process loads an equal part of the batch")
    return cfg.train.batch_size // process_count


def check_vocab(cfg: Config, tok) -> None:
    """The tokenizer's ids must fit the model's embedding: a clear error before any compute."""
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; set --set model.vocab_size={tok.vocab_size} (or larger)")


def _produce(batches: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """The loader thread: fills ``out`` until the batches end, fail, or ``stop`` is set.

    A plain function, not a method, so the thread holds no reference to the ``TrainLoader``: a
    loader nobody closed can still be garbage collected, which stops the thread.
    """

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in batches:
            if not put(item):
                return
        put(_END)
    except BaseException as e:  # handed to the consumer, raised from next()
        put(_Failure(e))


class TrainLoader:
    """Iterator of packed training batches with a prefetch thread. See the module docstring."""

    def __init__(self, batches: Iterator[tuple[np.ndarray, dict]], start_state: dict, prefetch: int,
                 on_close=None):
        self._state = start_state
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._on_close = on_close
        self._done = False
        self._thread = threading.Thread(target=_produce, args=(batches, self._queue, self._stop),
                                        name="bitnet-data", daemon=True)
        self._thread.start()

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> np.ndarray:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        """JSON-ready position right after the last batch ``next()`` returned."""
        import copy

        return copy.deepcopy(self._state)

    def close(self) -> None:
        self._stop.set()
        self._done = True
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=10)
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def build_train_loader(cfg: Config, tok, process_index: int = 0, process_count: int = 1,
                       state: dict | None = None, heldout: HeldOut | None = None) -> TrainLoader:
    """This process's training batches (see the module docstring); ``state`` resumes exactly.
    ``heldout``: the run's ``heldout_set`` when the caller has it already (read once per start)."""
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is outside [0, {process_count})")
    rows = rows_per_process(cfg, process_count)
    if process_count > 1 and not cfg.data.repeat:
        # Shards hold different numbers of documents, so one process would run out while the others
        # wait for it in the next collective: no clean way to agree on the end without a per-step sync.
        raise DataError("data.repeat=false is not supported with several processes (their shards end at "
                        "different steps); keep data.repeat=true and bound the run with train.steps")
    check_vocab(cfg, tok)
    spec = source_spec(cfg.data)
    # Opens the source here (unless given): bad data fails in the caller.
    heldout = heldout if heldout is not None else heldout_set(cfg, tok, spec)
    header = {"format": STATE_FORMAT, "source": spec.key, "process_index": process_index,
              "process_count": process_count, "heldout_sha256": heldout.sha256,
              "tokenizer_sha256": tok.json_sha256}
    if state is None:
        state = {**header, "position": None, "skip_tokens": 0, "piece": dict(_DOCUMENT_START), "batches": 0, "tokens": 0}
    else:
        _check_state(state, header)
    encoder = DocumentTokenizer(tok, cfg.data.num_workers)
    batches = _batches(cfg, spec, heldout, encoder, rows, process_index, process_count, state, header)
    return TrainLoader(batches, state, cfg.data.prefetch_batches, on_close=encoder.close)


def _check_state(state: dict, header: dict) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataError(f"the data loader state is not a {STATE_FORMAT} state (got keys "
                        f"{sorted(state) if isinstance(state, dict) else type(state).__name__}); "
                        "resume from a state saved by this version of the loader")
    for key, value in header.items():
        if state.get(key) != value:
            raise DataError(
                f"the data loader state was saved with {key}={state.get(key)!r} but this run has {value!r}: "
                "resume with the same data section, tokenizer, eval settings and number of processes, "
                "or start the data from scratch")


def _batches(cfg: Config, spec, heldout: HeldOut, encoder: DocumentTokenizer, rows: int,
             process_index: int, process_count: int, state: dict, header: dict):
    """Yields (batch, state after it). Runs in the loader thread."""
    seq_len = cfg.train.seq_len
    stream = DocumentStream(spec, process_index=process_index, process_count=process_count,
                            repeat=cfg.data.repeat, position=state["position"], exclude=heldout.digests)
    packer = Packer(seq_len)
    piece = state.get("piece", _DOCUMENT_START)
    skip = state["skip_tokens"] - piece["tokens_before"]  # tokens used from that piece on
    doc_tokens = piece["tokens_before"]  # tokens of the current document before the current piece
    n_batches, n_tokens = state["batches"], state["tokens"]

    pieces = _pieces(encoder.tok, stream, piece["start_char"])
    calls = bounded_batches(pieces, cfg.data.tokenize_batch, CALL_CHARS, chars=lambda item: len(item[0].text))
    for arrays, call in encoder.map(([p for p, _ in call], call) for call in calls):
        for ids, (p, position) in zip(arrays, call):
            if p.first:
                doc_tokens = 0
            if skip and skip >= ids.shape[0] and not p.last:  # a whole piece used (states without "piece")
                skip -= ids.shape[0]
                doc_tokens += ids.shape[0]
                continue
            packer.push(ids, (position, p.start, doc_tokens))
            doc_tokens += ids.shape[0]
            if skip:  # resuming inside this (the first) piece
                packer.skip(skip)
                skip = 0
            while packer.can_take(rows):
                batch = packer.take(rows)
                n_batches += 1
                n_tokens += rows * seq_len
                (position_after, start_char, tokens_before), used = packer.head()
                yield batch, {**header, "position": position_after, "skip_tokens": tokens_before + used,
                              "piece": {"start_char": start_char, "tokens_before": tokens_before},
                              "batches": n_batches, "tokens": n_tokens}


def _pieces(tok, stream: DocumentStream, start_char: int):
    """(piece, position of its document) for the stream's documents, the first from ``start_char``."""
    for text, position in stream:
        try:
            yield from ((p, position) for p in tok.pieces(text, start_char))
        except ValueError as e:
            raise DataError(f"the data loader state does not match this data ({e}); resume with the data "
                            "the run was trained on, or start the data from scratch") from None
        start_char = 0


def build_eval_batches(cfg: Config, tok, process_index: int = 0, process_count: int = 1,
                       heldout: HeldOut | None = None) -> list[np.ndarray]:
    """``eval.batches`` fixed held-out batches for this process, int32 ``[rows, seq_len + 1]`` each.

    The held-out token stream (``heldout.py``) is packed by the training contract into
    ``eval.batches * train.batch_size`` global rows; global batch ``b`` is rows
    ``[b * batch_size, (b + 1) * batch_size)`` and this process takes its contiguous slice of it
    (``process_index * rows`` onwards), the layout ``jax.make_array_from_process_local_data``
    expects. The same config and tokenizer give the same batches on every call.
    """
    rows = rows_per_process(cfg, process_count)
    check_vocab(cfg, tok)
    if cfg.eval.batches <= 0:
        return []
    heldout = heldout if heldout is not None else heldout_set(cfg, tok, source_spec(cfg.data))
    all_rows = rows_from_stream(heldout.tokens, cfg.train.seq_len, cfg.eval.batches * cfg.train.batch_size)
    out = []
    for b in range(cfg.eval.batches):
        start = b * cfg.train.batch_size + process_index * rows
        out.append(np.ascontiguousarray(all_rows[start:start + rows]))
    return out
