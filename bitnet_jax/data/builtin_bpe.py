"""The builtin tokenizer: a byte-level BPE trained on the builtin corpus on first use, then cached.

Training takes about a second and is deterministic, so every machine builds the same tokenizer; the
cache (``${XDG_CACHE_HOME:-~/.cache}/bitnet_jax/``) is keyed by vocabulary size and the corpus
hash, so a Python version with different pydoc text gets its own entry. ``<s>`` and ``</s>`` are
ids 0 and 1, the BOS/EOS the packer uses.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from bitnet_jax.data.builtin import builtin_corpus_sha256, builtin_documents
from bitnet_jax.data.errors import DataError

BOS, EOS = "<s>", "</s>"
_MIN_VOCAB = 256 + 2  # every byte plus BOS/EOS


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "bitnet_jax"


def train_builtin_bpe(vocab_size: int) -> _Backend:
    """A fresh byte-level BPE with ``vocab_size`` tokens trained on the builtin corpus."""
    tok = _Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes, no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(builtin_documents(), trainer=trainer)
    return tok


def builtin_backend(vocab_size: int) -> tuple[_Backend, Path | None]:
    """The cached builtin tokenizer (trained and written on first use) and its cache file (None when
    the cache cannot be written). ``tokenizer.load_tokenizer`` wraps it with BOS/EOS."""
    if vocab_size < _MIN_VOCAB:
        raise DataError(f"tokenizer.builtin_vocab_size must be at least {_MIN_VOCAB} (256 bytes + BOS/EOS), "
                        f"got {vocab_size}")
    path = cache_dir() / f"builtin_bpe_v{vocab_size}_{builtin_corpus_sha256()[:16]}" / "tokenizer.json"
    backend = None
    if path.is_file():
        try:
            backend = _Backend.from_file(str(path))
        except Exception:  # a damaged cache entry is rebuilt below
            backend = None
    if backend is None:
        backend = train_builtin_bpe(vocab_size)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # write-then-rename: processes starting together never read a half-written file
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            backend.save(tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home still trains in memory every time
    return backend, path if path.is_file() else None
