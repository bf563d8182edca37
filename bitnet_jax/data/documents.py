"""Documents in stream order, each with the resumable position just before it.

A *position* is plain JSON: ``{"epoch": e, "dataset": <IterableDataset.state_dict() or None>,
"doc_index": i}``. Opening a ``DocumentStream`` at a position yields that document first, then
the ones after it, bit for bit as the original run saw them. ``dataset: None`` means the start of
epoch ``e``.

Multi-process: rows-are-documents sources are sharded with ``split_dataset_by_node`` (whole files
per process where the file count divides evenly, else every n-th row). WikiText's rows are lines,
and an article must not be cut between processes, so there every process reads all lines and keeps
the articles whose index ``i`` has ``i % process_count == process_index``.

Documents that are empty or only whitespace are dropped. ``exclude`` drops documents by the
blake2b digest of their text (the held-out set, and any exact copy of it later in the stream).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterator

from bitnet_jax.data.errors import DataError
from bitnet_jax.data.sources import SourceSpec, open_rows

Position = dict[str, Any]

# " = Title = " opens an article; " = = Section = = " (two or more '=') does not.
_ARTICLE_TITLE = re.compile(r"^ ?= [^=].*[^=] = ?$|^ ?= [^=] = ?$")


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def is_article_title(line: str) -> bool:
    return bool(_ARTICLE_TITLE.match(line))


class DocumentStream:
    """Iterates ``(text, position)`` of one process's documents, wrapping epochs when ``repeat``."""

    def __init__(self, spec: SourceSpec, *, process_index: int = 0, process_count: int = 1,
                 repeat: bool = False, position: Position | None = None,
                 exclude: frozenset[bytes] = frozenset()):
        self.spec = spec
        self.process_index, self.process_count = process_index, process_count
        self.repeat = repeat
        self.start = position or {"epoch": 0, "dataset": None, "doc_index": 0}
        self.exclude = exclude

    def _dataset(self, state: dict | None):
        # A fresh dataset object per epoch: one that loaded a state restarts from it on every iter().
        ds = open_rows(self.spec)
        if self.process_count > 1 and not self.spec.lines_are_rows:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self.process_index, world_size=self.process_count)
        if state is not None:
            ds.load_state_dict(state)
        return ds

    def __iter__(self) -> Iterator[tuple[str, Position]]:
        epoch, state, doc_index = self.start["epoch"], self.start["dataset"], self.start["doc_index"]
        while True:
            fresh = state is None
            produced = 0
            for text, position in self._epoch(epoch, state, doc_index):
                produced += 1
                yield text, position
            if fresh and produced == 0:
                raise DataError(self._empty_message())
            if not self.repeat:
                return
            epoch, state, doc_index = epoch + 1, None, 0

    def _epoch(self, epoch: int, state: dict | None, doc_index: int) -> Iterator[tuple[str, Position]]:
        ds = self._dataset(state)
        rows = self._rows(ds, state)
        docs = _articles(rows) if self.spec.lines_are_rows else rows
        for text, ds_state in docs:
            index = doc_index
            doc_index += 1
            if self.spec.lines_are_rows and index % self.process_count != self.process_index:
                continue
            if not text or text.isspace():  # isspace: no copy of a long text
                continue
            if self.exclude and text_digest(text) in self.exclude:
                continue
            yield text, {"epoch": epoch, "dataset": ds_state, "doc_index": index}

    def _rows(self, ds, loaded_state: dict | None) -> Iterator[tuple[str, dict]]:
        """(text, dataset state just before this row) for every row. ``loaded_state`` is the state ``ds``
        was opened at: until iteration begins, ``datasets`` reports the epoch's start instead of it,
        and a position saved within the first document would then resume at the wrong place."""
        column = self.spec.text_column
        it = iter(ds)
        checked = False
        before = loaded_state
        read = 0
        while True:
            if before is None:
                before = ds.state_dict()
            try:
                row = next(it)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise DataError(non_utf8_message(self.spec, e)) from None
            except DataError:
                raise
            except Exception as e:  # a malformed json/csv/parquet row, a dropped connection: say where
                bad = self._file_being_read(ds)
                raise DataError(f"reading {self._what()} failed after {read} rows of this epoch"
                                f"{f', in {bad}' if bad else ''}: {type(e).__name__}: {e}. Fix or remove the bad "
                                "file (for a hub dataset, check the network and resume)") from e
            read += 1
            if not checked:
                if column not in row:
                    raise DataError(
                        f"data.text_column {column!r} is not a column of {self._what()}; columns found: "
                        f"{', '.join(map(str, row)) or 'none'}. Set it, e.g. --set data.text_column={next(iter(row), 'text')}")
                checked = True
            text = row[column]
            if text is not None and not isinstance(text, str):
                raise DataError(f"data.text_column {column!r} of {self._what()} holds "
                                f"{type(text).__name__} values, not text; choose a text column")
            yield text, before
            before = None

    def _file_being_read(self, ds) -> str | None:
        """The file of ``spec.files`` that ``ds`` was reading: the shard its state names, when each
        file is one shard (not after a split by process), else None."""
        try:
            state, shards = ds.state_dict(), ds.n_shards
        except Exception:
            return None
        while isinstance(state, dict) and "shard_idx" not in state:
            state = state.get("examples_iterable")
        index = state.get("shard_idx") if isinstance(state, dict) else None
        files = self.spec.files
        return files[index] if isinstance(index, int) and len(files) == shards and 0 <= index < len(files) else None

    def _what(self) -> str:
        if self.spec.files:
            return f"{self.spec.files[0]}" + (f" (+{len(self.spec.files) - 1} more files)" if len(self.spec.files) > 1 else "")
        if self.spec.hf_path:
            return f"{self.spec.hf_path} ({self.spec.hf_name}, {self.spec.split})"
        return "the builtin corpus"

    def _empty_message(self) -> str:
        shard = f" for process {self.process_index} of {self.process_count}" if self.process_count > 1 else ""
        dropped = " once the held-out evaluation documents are removed" if self.exclude else ""
        return (f"the dataset {self._what()} has no documents{shard}{dropped}: every row is empty or missing. "
                "Give files with text in them (data.data_files), check data.text_column, or lower data.eval_documents")


def _articles(rows: Iterator[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
    """WikiText lines -> articles: a ``" = Title = "`` line opens a new one; blank lines are dropped
    and the rest joined with newlines, so the hub rows and the raw files give the same articles.

    Without the blank lines (absent from some copies) a title cannot be told from the rare body line
    of the same shape (two equation fragments in the test split's "Constant k filter"), which then
    also starts a document: 62 documents for the 60 test articles. Harmless for training.
    """
    lines: list[str] = []
    start = None
    for line, before in rows:
        line = (line or "").rstrip("\r\n")
        if not line.strip():
            continue
        if lines and is_article_title(line):
            yield "\n".join(lines), start
            lines = []
        if not lines:
            start = before
        lines.append(line)
    if lines:
        yield "\n".join(lines), start


def non_utf8_message(spec: SourceSpec, error: UnicodeDecodeError) -> str:
    """Names the first file that is not UTF-8, and where, by scanning the files (error path only)."""
    import codecs

    for path in spec.files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    decoder.decode(block)
                    offset += len(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            at = offset + e.start
            return (f"{path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {at} cannot be decoded. "
                    "Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT) or remove it from data.data_files")
    return f"a data file is not UTF-8 text ({error}); convert it to UTF-8 or remove it from data.data_files"
