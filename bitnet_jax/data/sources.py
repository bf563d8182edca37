"""Where documents come from: each ``data.source`` opened as a ``datasets`` streaming dataset.

Every source goes through ``IterableDataset`` (hub data, local files and the builtin corpus alike),
so iteration, ``state_dict()`` resume and ``split_dataset_by_node`` are one code path.

- ``fineweb_edu``: ``HuggingFaceFW/fineweb-edu``, config ``sample-10BT``, column ``text``; with
  ``data.data_files`` the same rows are read from local files (e.g. parquet shards) instead.
- ``wikitext``: WikiText-103 raw (``Salesforce/wikitext``, ``wikitext-103-raw-v1``) or local raw
  files; the rows are lines, grouped into articles by ``documents.py``.
- ``local``: txt / jsonl / json / parquet / csv / tsv files, globs or folders, column
  ``data.text_column``; a txt file gives one document per paragraph (blank-line separated) or per
  line or per file (``data.text_unit``).
- ``builtin``: the pydoc corpus of ``builtin.py``, one document per topic.

Local files are read in the order given, each glob or folder expanded in sorted order.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from bitnet_jax.config import DataConfig
from bitnet_jax.data.errors import DataError, offline_hint
from bitnet_jax.data.hashing import file_sha256

HUB_DEFAULTS = {  # source -> (hub dataset, config)
    "fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}
_BUILDERS = {
    ".txt": "text", ".text": "text", ".raw": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet", ".csv": "csv", ".tsv": "csv",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A resolved ``data`` section: exactly which rows the stream reads."""

    source: str
    text_column: str
    hf_path: str | None = None  # hub dataset (None when reading local files or the builtin corpus)
    hf_name: str | None = None
    split: str = "train"
    files: tuple[str, ...] = ()  # resolved local files
    builder: str | None = None  # datasets packaged builder for the local files
    text_unit: str = "paragraph"  # txt files: paragraph | line | file

    @property
    def lines_are_rows(self) -> bool:
        """WikiText rows are lines of articles; every other source has one document per row."""
        return self.source == "wikitext"

    @property
    def key(self) -> str:
        """A short stable identity, stored in loader states to refuse resuming on other data."""
        text = repr((self.source, self.text_column, self.hf_path, self.hf_name, self.split,
                     self.files, self.builder, self.text_unit))
        return f"{self.source}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def source_spec(cfg: DataConfig) -> SourceSpec:
    """Resolves the data config; missing files and unusable formats fail here, before any compute."""
    if cfg.source == "builtin":
        return SourceSpec("builtin", text_column="text")
    text_column = cfg.text_column
    if cfg.data_files:
        files = resolve_data_files(cfg.data_files)
        builder = builder_for(files)
        text_unit = "line" if cfg.source == "wikitext" else cfg.text_unit
        return SourceSpec(cfg.source, text_column, split=cfg.split, files=tuple(files),
                          builder=builder, text_unit=text_unit)
    if cfg.source == "local":
        raise DataError("data.source is 'local' but data.data_files is empty; give files, globs or folders, "
                        "e.g. --set data.data_files=corpus/*.txt")
    hf_path, hf_name = HUB_DEFAULTS[cfg.source]
    return SourceSpec(cfg.source, text_column, hf_path=cfg.hf_path or hf_path,
                      hf_name=cfg.hf_name or (hf_name if not cfg.hf_path else None), split=cfg.split)


def resolve_data_files(patterns: list[str]) -> list[str]:
    """Files, globs (``**`` allowed) and folders -> existing files, in order, without repeats."""
    out: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if any(c in expanded for c in "*?["):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data.data_files: the glob {pattern!r} matches no files (from {Path.cwd()}); "
                                "check the path, or quote it so the shell does not expand it")
        elif os.path.isdir(expanded):
            matches = sorted(str(p) for p in Path(expanded).rglob("*") if p.is_file() and _suffix(p.name) in _BUILDERS)
            if not matches:
                raise DataError(f"data.data_files: the folder {pattern!r} has no data files "
                                f"({', '.join(sorted(_BUILDERS))})")
        elif os.path.isfile(expanded):
            matches = [expanded]
        else:
            raise DataError(f"data.data_files: {pattern!r} does not exist (from {Path.cwd()}); give existing "
                            "files, globs or folders, e.g. --set data.data_files=data/*.parquet")
        out += [str(Path(m).resolve()) for m in matches]
    return list(dict.fromkeys(out))


def _suffix(name: str) -> str:
    """The format suffix of a file name, looking through a compression suffix (.jsonl.gz -> .jsonl)."""
    p = Path(name.lower())
    if p.suffix in _COMPRESSIONS:
        p = p.with_suffix("")
    return p.suffix


def builder_for(files: list[str]) -> str:
    """The ``datasets`` packaged builder reading all ``files`` (one format per source)."""
    kinds = {}
    for f in files:
        builder = _BUILDERS.get(_suffix(f))
        if builder is None:
            raise DataError(f"data.data_files: cannot read {f}: unknown format {_suffix(f) or '(no suffix)'}; "
                            f"supported: {', '.join(sorted(_BUILDERS))} (optionally compressed: "
                            f"{', '.join(_COMPRESSIONS)})")
        kinds.setdefault(builder, f)
    if len(kinds) > 1:
        raise DataError("data.data_files mixes formats (" + ", ".join(f"{b}: {f}" for b, f in kinds.items())
                        + "); use one format per run")
    return next(iter(kinds))


def open_rows(spec: SourceSpec):
    """The source's rows as a fresh ``datasets.IterableDataset`` (never iterated yet)."""
    import datasets

    if spec.source == "builtin":
        from bitnet_jax.data.builtin import builtin_documents

        return datasets.Dataset.from_dict({"text": list(builtin_documents())}).to_iterable_dataset(num_shards=1)
    if spec.files:
        kwargs: dict[str, Any] = {}
        if spec.builder == "text":
            kwargs["sample_by"] = {"paragraph": "paragraph", "line": "line", "file": "document"}[spec.text_unit]
            kwargs["encoding"] = "utf-8"
        if spec.builder == "csv" and all(_suffix(f) == ".tsv" for f in spec.files):
            kwargs["sep"] = "\t"
        if spec.builder == "json":  # its logged error on a malformed file repeats what our DataError says
            logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
        try:
            return datasets.load_dataset(spec.builder, data_files={"train": list(spec.files)}, split="train",
                                         streaming=True, **kwargs)
        except Exception as e:
            raise DataError(f"cannot open {len(spec.files)} {spec.builder} file(s) starting with "
                            f"{spec.files[0]}: {type(e).__name__}: {e}") from None
    try:
        return datasets.load_dataset(spec.hf_path, name=spec.hf_name, split=spec.split, streaming=True)
    except Exception as e:
        raise hub_error(spec, e) from None


def hub_error(spec: SourceSpec, e: BaseException) -> DataError:
    from bitnet_jax.console import command  # the interpreter that runs (.venv/bin/python after make train)

    fixture = command("python", "-m", "bitnet_jax.data.make_fineweb_fixture", "OUT.parquet")
    example = (f"--set data.data_files=fineweb.parquet (build a small one with {fixture})"
               if spec.source == "fineweb_edu" else "--set 'data.data_files=[wiki.train.raw]'")
    return DataError(
        f"cannot open the hub dataset {spec.hf_path} (config {spec.hf_name}, split {spec.split}): "
        f"{type(e).__name__}: {e}. {offline_hint()}To read the same data from local files instead, "
        f"point the source at them: {example}")


def describe_source(spec: SourceSpec, *, hash_files: bool = True,
                    known: dict[str, dict] | None = None) -> dict[str, Any]:
    """What the stream reads: hub name/config/split, or every file with its size, modification time
    and sha256. ``known`` maps a path to an earlier description of it (a resumed run's fingerprint):
    a file with the same size and modification time keeps its sha256 instead of being read again
    (tens of GB for a local copy of FineWeb-Edu)."""
    out: dict[str, Any] = {"source": spec.source, "text_column": spec.text_column}
    if spec.source == "builtin":
        import sys

        from bitnet_jax.data.builtin import builtin_corpus_sha256, builtin_documents

        out.update(corpus="pydoc_data.topics.topics", python=sys.version.split()[0],
                   documents=len(builtin_documents()), sha256=builtin_corpus_sha256())
    elif spec.files:
        out.update(builder=spec.builder, text_unit=spec.text_unit if spec.builder == "text" else None,
                   files=[_describe_file(f, hash_files, (known or {}).get(f)) for f in spec.files])
    else:
        out.update(hf_path=spec.hf_path, hf_name=spec.hf_name, split=spec.split)
    return out


def _describe_file(path: str, hash_files: bool, known: dict | None) -> dict[str, Any]:
    st = os.stat(path)
    entry: dict[str, Any] = {"path": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if hash_files:
        same = known and known.get("bytes") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns
        entry["sha256"] = known["sha256"] if same and known.get("sha256") else file_sha256(path)
    return entry

