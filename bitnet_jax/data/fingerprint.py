"""``dataset_fingerprint.json``: what a run trained on, checkable later without the data.

Holds the source description (hub name/config/split, or every file with its size and sha256), the
tokenizer identity (name, vocabulary size, BOS/EOS, sha256 of its files), the held-out set, and the
first 1000 token ids of the (single-process, unsharded) training stream with their sha256 (over the
ids as little-endian int32).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_jax.config import Config
from bitnet_jax.data.documents import DocumentStream
from bitnet_jax.data.heldout import heldout_set
from bitnet_jax.data.packing import stream_tokens
from bitnet_jax.data.sources import describe_source, source_spec

FIRST_TOKENS = 1000


def training_stream_head(cfg: Config, tok, n: int = FIRST_TOKENS, heldout=None) -> np.ndarray:
    """The first ``n`` token ids of the training stream (process 0 of 1), int32."""
    spec = source_spec(cfg.data)
    heldout = heldout if heldout is not None else heldout_set(cfg, tok, spec)
    pieces, have = [], 0
    for text, _ in DocumentStream(spec, repeat=cfg.data.repeat, exclude=heldout.digests):
        for piece in tok.pieces(text):  # piece by piece: a long first document is not read to its end
            pieces.append(tok.encode_pieces([piece])[0])
            have += pieces[-1].shape[0]
            if have >= n:
                return stream_tokens(pieces, n)
    return stream_tokens(pieces, n)


def fingerprint(cfg: Config, tok, previous: dict[str, Any] | None = None, heldout=None) -> dict[str, Any]:
    """The fingerprint of ``cfg``'s data; ``previous`` (the run's earlier one) spares re-hashing files
    whose size and modification time have not changed; ``heldout``: the run's ``heldout_set``, if read."""
    spec = source_spec(cfg.data)
    heldout = heldout if heldout is not None else heldout_set(cfg, tok, spec)
    head = training_stream_head(cfg, tok, FIRST_TOKENS, heldout)
    known = {f["path"]: f for f in ((previous or {}).get("source") or {}).get("files", [])}
    return {
        "source": describe_source(spec, known=known),
        "tokenizer": tok.describe(),
        "heldout": {**heldout.describe(), "definition": "the first documents of the stream, never trained on"},
        "packing": {"seq_len": cfg.train.seq_len, "rows_overlap_tokens": 1, "bos_id": tok.bos_id,
                    "eos_id": tok.eos_id, "repeat": cfg.data.repeat},
        "first_token_ids": head.tolist(),
        "first_token_ids_sha256": hashlib.sha256(head.astype("<i4").tobytes()).hexdigest(),
    }


def write_fingerprint(path: str | Path, cfg: Config, tok, heldout=None) -> dict[str, Any]:
    """Writes ``dataset_fingerprint.json`` (atomically) and returns its content. When the file is
    already there (a resumed run), unchanged files are not hashed again, and data that differs from
    what the run trained on so far is reported on stderr: the resume then continues on other data."""
    path = Path(path)
    previous = _read(path)
    data = fingerprint(cfg, tok, previous, heldout)
    changed = _changed(previous, data) if previous else []
    if changed:
        print(f"warning: the data differs from what this run trained on until now ({', '.join(changed)}; "
              f"see {path}); the run continues on the data as it is now", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return data


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _changed(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (file modification times aside)."""
    def content(files):
        return [{k: v for k, v in f.items() if k != "mtime_ns"} for f in files or []]

    out = []
    b_src, n_src = dict(before.get("source") or {}), dict(now["source"])
    if content(b_src.pop("files", None)) != content(n_src.pop("files", None)):
        out.append("data files (paths, sizes or sha256)")
    if b_src != n_src:
        out.append("source")
    for key, what in (("tokenizer", "tokenizer"), ("heldout", "held-out set"),
                      ("first_token_ids_sha256", "first training tokens")):
        if before.get(key) != now.get(key):
            out.append(what)
    return out
