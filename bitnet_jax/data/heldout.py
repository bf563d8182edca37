"""The held-out evaluation set, the same definition for every source.

Held out = the first ``data.eval_documents`` documents of the whole stream (epoch 0, before any
per-process sharding), in stream order. With ``data.eval_documents: null`` (the default) it is
the smallest number of leading documents whose packed tokens fill ``eval.batches`` global batches.
Every process computes the same set; training never sees those documents (nor any exact copy of
one later in the stream: the training stream drops documents by the digest of their text).

Per source that is: ``builtin``: the first pydoc topics in sorted order; ``fineweb_edu``: the first
rows of the (local or hub) stream; ``wikitext``: the first articles; ``local``: the first
documents (rows, or paragraphs / lines / files of txt) of the first files.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from bitnet_jax.config import Config
from bitnet_jax.data.documents import DocumentStream, text_digest
from bitnet_jax.data.errors import DataError
from bitnet_jax.data.pieces import bounded_batches
from bitnet_jax.data.sources import SourceSpec


@dataclasses.dataclass(frozen=True)
class HeldOut:
    documents: int  # how many leading documents are held out
    digests: frozenset[bytes]  # their text digests (what training skips)
    tokens: np.ndarray  # their packed token stream, int32, BOS/EOS included
    sha256: str  # identity of the set, stored in loader states

    def describe(self) -> dict:
        return {"documents": self.documents, "tokens": int(self.tokens.shape[0]), "sha256": self.sha256}


def eval_tokens_needed(cfg: Config) -> int:
    """Tokens that ``eval.batches`` global batches of packed rows use."""
    if cfg.eval.batches <= 0:
        return 0
    return cfg.eval.batches * cfg.train.batch_size * cfg.train.seq_len + 1


def heldout_set(cfg: Config, tok, spec: SourceSpec) -> HeldOut:
    """Reads (and tokenizes) the leading documents that form the held-out set.

    Also opens the source and reads its first document even when nothing is held out, so bad data
    (missing column, empty files, the hub unreachable) fails here, in the caller, before any compute.
    """
    need = eval_tokens_needed(cfg)
    wanted = cfg.data.eval_documents
    digests: list[bytes] = []
    arrays: list[np.ndarray] = []
    have = 0
    chunk = max(1, min(cfg.data.tokenize_batch, 64))

    def enough() -> bool:
        return len(digests) == wanted if wanted is not None else have >= need

    docs = (text for text, _ in DocumentStream(spec, repeat=False))
    more = True  # whether a document follows the held-out ones (else nothing is left to train on)
    for texts in bounded_batches(docs, chunk):
        if wanted == 0 or (wanted is None and need == 0):
            break  # the first document was read: the source works
        for i, (text, ids) in enumerate(zip(texts, tok.encode_documents(texts))):
            digests.append(text_digest(text))
            arrays.append(ids)
            have += ids.shape[0]
            if enough():
                more = i < len(texts) - 1 or next(docs, None) is not None
                break
        if enough():
            break  # read no further than the held-out documents (and one more)
    else:
        more = False
    if wanted is not None and len(digests) < wanted:
        raise DataError(f"data.eval_documents={wanted} but the dataset has only {len(digests)} documents, "
                        "leaving nothing to train on; lower data.eval_documents")
    if have < need:
        hint = ("raise data.eval_documents or set it to null (auto)" if wanted is not None
                else "the dataset is too small for that; use more data")
        raise DataError(
            f"the held-out documents ({len(digests)}) hold {have} tokens but evaluation needs {need} "
            f"(eval.batches {cfg.eval.batches} x train.batch_size {cfg.train.batch_size} x train.seq_len "
            f"{cfg.train.seq_len} + 1); lower eval.batches, or {hint}")
    if not more:  # the held-out set took every document: name the key that sets its size
        key = ("data.eval_documents" if wanted is not None else
               f"eval.batches (data.eval_documents is null, so as many documents as eval.batches={cfg.eval.batches} "
               "batches need are held out)")
        raise DataError(f"the held-out set takes every document of the dataset ({len(digests)}), leaving nothing "
                        f"to train on; lower {key}, or use more data")
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    ident = hashlib.sha256(b"".join(digests)).hexdigest()
    return HeldOut(len(digests), frozenset(digests), tokens, ident)
