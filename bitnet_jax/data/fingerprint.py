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
    heldout = heldout or heldout_set(cfg, tok, spec)
    docs, have = [], 0
    for text, _ in DocumentStream(spec, repeat=cfg.data.repeat, exclude=heldout.digests):
        ids = tok.encode_documents([text])[0]
        docs.append(ids)
        have += ids.shape[0]
        if have >= n:
            break
    return stream_tokens(docs, n)


def fingerprint(cfg: Config, tok) -> dict[str, Any]:
    spec = source_spec(cfg.data)
    heldout = heldout_set(cfg, tok, spec)
    head = training_stream_head(cfg, tok, FIRST_TOKENS, heldout)
    return {
        "source": describe_source(spec),
        "tokenizer": tok.describe(),
        "heldout": {**heldout.describe(), "definition": "the first documents of the stream, never trained on"},
        "packing": {"seq_len": cfg.train.seq_len, "rows_overlap_tokens": 1, "bos_id": tok.bos_id,
                    "eos_id": tok.eos_id, "repeat": cfg.data.repeat},
        "first_token_ids": head.tolist(),
        "first_token_ids_sha256": hashlib.sha256(head.astype("<i4").tobytes()).hexdigest(),
    }


def write_fingerprint(path: str | Path, cfg: Config, tok) -> dict[str, Any]:
    """Writes ``dataset_fingerprint.json`` (atomically) and returns its content."""
    data = fingerprint(cfg, tok)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return data
