"""One tokenizer type for every source of tokenizers, on the ``tokenizers`` (Rust) backend.

``load_tokenizer(TokenizerConfig)`` accepts:

- ``builtin``: a byte-level BPE trained on the builtin corpus (see ``builtin_bpe.py``);
- a ``tokenizer.json`` file, or a folder holding one (a transformers tokenizer folder, or a folder
  written by ``Tokenizer.save``); BOS/EOS come from its ``tokenizer_config.json`` /
  ``special_tokens_map.json`` when present;
- a SentencePiece ``tokenizer.model`` file, or a folder holding one (converted exactly, ``spm.py``);
- a Hugging Face hub name (``meta-llama/Llama-2-7b-hf``), fetched through the hub cache.

Text is always encoded without added BOS/EOS and with ``encode_special_tokens`` on, so a literal
``"<s>"`` inside a document is ordinary text (as in SentencePiece), never a control token. The
packer adds BOS/EOS ids itself. Documents are encoded piece by piece (``pieces.py``): a long one
costs the memory of its pieces, not of its whole text, and gives the same ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer as _Backend

from bitnet_jax.config import TokenizerConfig
from bitnet_jax.data.builtin_bpe import BOS, EOS, builtin_backend
from bitnet_jax.data.errors import DataError, offline_hint
from bitnet_jax.data.hashing import file_sha256
from bitnet_jax.data.pieces import CALL_CHARS, Piece, SplitRule, bounded_batches, split_document, split_rule
from bitnet_jax.data.spm import tokenizer_from_spm

_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PIECES_PER_CALL = 256  # at most, in encode_documents (the characters bound a call first)
_HUB_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    """A loaded tokenizer: ids in, ids out, with the BOS/EOS ids the packer uses.

    Picklable (worker processes get a copy). ``files`` are the files it was built from: their
    sha256 goes into ``describe()`` and ``save()`` copies a SentencePiece model along.
    """

    def __init__(self, backend: _Backend, *, name_or_path: str, kind: str,
                 bos_token: str | None, eos_token: str | None, files: Sequence[Path] = ()):
        backend.encode_special_tokens = True
        self.backend = backend
        self.name_or_path = name_or_path
        self.kind = kind
        self.files = [Path(f) for f in files]
        self.bos_token = bos_token if bos_token and backend.token_to_id(bos_token) is not None else None
        self.eos_token = eos_token if eos_token and backend.token_to_id(eos_token) is not None else None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["backend"] = self.backend.to_str()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        backend = _Backend.from_str(state.pop("backend"))
        backend.encode_special_tokens = True
        self.__dict__.update(state, backend=backend)

    # ----------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts, in parallel on the backend's thread pool (GIL released)."""
        return [e.ids for e in self._encode_many(texts)]

    def encode_documents(self, texts: Iterable[str]) -> list[np.ndarray]:
        """Each text as int32 ``[BOS] + ids + [EOS]`` (BOS/EOS where the tokenizer has them), encoded
        piece by piece in calls of at most ``pieces.CALL_CHARS`` characters."""
        pieces = (piece for text in texts for piece in self.pieces(text))
        out, parts = [], []
        for call in bounded_batches(pieces, _PIECES_PER_CALL, CALL_CHARS, chars=lambda p: len(p.text)):
            for piece, ids in zip(call, self.encode_pieces(call)):
                parts.append(ids)
                if piece.last:
                    out.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
                    parts = []
        return out

    @functools.cached_property
    def split_rule(self) -> SplitRule:
        """Where this tokenizer's documents may be cut (``pieces.py``)."""
        return split_rule(json.loads(self.backend.to_str()))

    def pieces(self, text: str, start: int = 0) -> Iterator[Piece]:
        """``text`` cut into pieces from character ``start`` on (``pieces.split_document``)."""
        return split_document(text, self.split_rule, start)

    def encode_pieces(self, pieces: Sequence[Piece]) -> list[np.ndarray]:
        """Each piece's ids as int32, BOS before a document's first piece and EOS after its last."""
        head = [] if self.bos_id is None else [self.bos_id]
        tail = [] if self.eos_id is None else [self.eos_id]
        return [np.array((head if p.first else []) + e.ids + (tail if p.last else []), dtype=np.int32)
                for p, e in zip(pieces, self._encode_many([p.text for p in pieces]))]

    def _encode_many(self, texts: Sequence[str]):
        texts = list(texts)
        fast = getattr(self.backend, "encode_batch_fast", None)  # no offsets: faster (tokenizers >= 0.20)
        return (fast or self.backend.encode_batch)(texts, add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------- files
    def save(self, directory: str | Path) -> Path:
        """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json (and tokenizer.model
        when built from SentencePiece). ``load_tokenizer`` and ``transformers.AutoTokenizer`` both
        load the folder with the same ids (``split_special_tokens`` keeps literal ``<s>`` as text)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v}
        unk = getattr(self.backend.model, "unk_token", None)
        if unk and self.backend.token_to_id(unk) is not None:
            special["unk_token"] = unk
        config = {
            # PreTrainedTokenizerFast keeps tokenizer.json as is; LlamaTokenizerFast would rebuild
            # the pipeline and drop a leading space.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            **special,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        for f in self.files:
            if f.name == "tokenizer.model" and f.resolve() != (out / f.name).resolve():
                shutil.copyfile(f, out / f.name)
        return out

    def describe(self) -> dict[str, Any]:
        """Identity of the tokenizer for fingerprints and provenance."""
        return {
            "name_or_path": self.name_or_path,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bos_token": self.bos_token, "bos_id": self.bos_id,
            "eos_token": self.eos_token, "eos_id": self.eos_id,
            "files": {f.name: file_sha256(f) for f in self.files if f.is_file()},
            "tokenizer_json_sha256": self.json_sha256,
        }

    @functools.cached_property
    def json_sha256(self) -> str:
        """sha256 of the backend serialised as tokenizer.json: what the data loader's state records."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, kind={self.kind}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id})")


# --------------------------------------------------------------------------- loading

def load_run_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    """The tokenizer a run saved in ``RUN_DIR/tokenizer`` (``Tokenizer.save``), for sampling and export."""
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise DataError(f"tokenizer folder {tokenizer_dir} does not exist; train.py writes the run's tokenizer "
                        "to RUN_DIR/tokenizer at the start of every run (is this a run directory?)")
    return load_tokenizer(TokenizerConfig(name_or_path=str(tokenizer_dir)))


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer named by ``tokenizer.name_or_path`` (see the module docstring)."""
    name = cfg.name_or_path
    if name == "builtin":
        backend, path = builtin_backend(cfg.builtin_vocab_size)
        return Tokenizer(backend, name_or_path="builtin", kind="builtin", bos_token=BOS, eos_token=EOS,
                         files=[path] if path else [])
    path = Path(os.path.expanduser(name))
    if path.exists():
        return _load_local(path, name)
    if _looks_like_path(name):
        raise DataError(
            f"tokenizer.name_or_path {name!r} does not exist (looked in {Path.cwd()}); give a "
            "tokenizer.json, a SentencePiece tokenizer.model, a tokenizer folder, a hub name, or "
            "'builtin', e.g. --set tokenizer.name_or_path=../shared/data/llama2_tokenizer")
    return _load_hub(name)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that is not on disk is a mistyped path.
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".json", ".model")))


def _load_local(path: Path, name: str) -> Tokenizer:
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json", name)
        if (path / "tokenizer.model").is_file():
            return _from_spm(path / "tokenizer.model", name)
        found = sorted(p.name for p in path.iterdir())[:20]
        raise DataError(
            f"tokenizer folder {path} holds neither tokenizer.json nor tokenizer.model (found: "
            f"{', '.join(found) or 'nothing'}); point tokenizer.name_or_path at a folder or file that has one")
    if path.suffix == ".json":
        return _from_tokenizer_json(path, name)
    return _from_spm(path, name)


def _from_tokenizer_json(path: Path, name: str) -> Tokenizer:
    try:
        backend = _Backend.from_file(str(path))
    except Exception as e:
        raise DataError(f"{path} is not a tokenizer.json the tokenizers library can load: {e}") from None
    bos, eos = _special_tokens_beside(path.parent)
    vocab = backend.get_vocab(with_added_tokens=True)
    bos = bos or next((t for t in _BOS_GUESSES if t in vocab), None)
    eos = eos or next((t for t in _EOS_GUESSES if t in vocab), None)
    files = [path] + [path.parent / f for f in ("tokenizer_config.json", "special_tokens_map.json")
                      if (path.parent / f).is_file()]
    return Tokenizer(backend, name_or_path=name, kind="tokenizer.json", bos_token=bos, eos_token=eos, files=files)


def _from_spm(path: Path, name: str) -> Tokenizer:
    backend, bos, eos = tokenizer_from_spm(path)
    return Tokenizer(backend, name_or_path=name, kind="sentencepiece", bos_token=bos, eos_token=eos, files=[path])


def _special_tokens_beside(folder: Path) -> tuple[str | None, str | None]:
    """bos/eos token strings from transformers' config files in ``folder``, if any."""
    found: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / fname
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        for key in ("bos_token", "eos_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
    return found.get("bos_token"), found.get("eos_token")


def _load_hub(name: str) -> Tokenizer:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    fetched: dict[str, Path] = {}
    for fname in _HUB_FILES:
        try:
            fetched[fname] = Path(hf_hub_download(name, fname))
        except EntryNotFoundError as e:
            if not isinstance(e, LocalEntryNotFoundError):  # that one means "offline, not cached"
                continue
            if "tokenizer.json" in fetched or "tokenizer.model" in fetched:
                continue
            if fname == "tokenizer.json":
                continue  # a cached tokenizer.model may still be there
            raise DataError(
                f"cannot fetch tokenizer {name!r} from the Hugging Face hub and it is not in the local hub "
                f"cache. {offline_hint()}Download it once where there is a network, or point "
                "tokenizer.name_or_path at local files, e.g. --set tokenizer.name_or_path=../shared/data/llama2_tokenizer"
            ) from None
        except GatedRepoError:  # a subclass of RepositoryNotFoundError: catch it first
            raise DataError(f"tokenizer {name!r} is a gated model on the Hugging Face hub: accept its licence on "
                            "the model page and log in (hf auth login, or set HF_TOKEN), or point "
                            "tokenizer.name_or_path at a local copy of its tokenizer files") from None
        except RepositoryNotFoundError:
            raise DataError(f"tokenizer {name!r} is neither a local path nor a model on the Hugging Face "
                            "hub; check the name or give a local tokenizer.json / tokenizer.model") from None
        except Exception as e:  # offline, no network
            if fname != "tokenizer.json" and "tokenizer.json" in fetched:
                continue
            raise DataError(
                f"cannot fetch tokenizer {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                f"{offline_hint()}Download it once where there is a network, or point "
                "tokenizer.name_or_path at local files, e.g. --set tokenizer.name_or_path=../shared/data/llama2_tokenizer"
            ) from None
    tok = None
    if "tokenizer.json" in fetched:
        try:
            tok = _from_tokenizer_json(fetched["tokenizer.json"], name)
        except DataError:
            if "tokenizer.model" not in fetched:  # some hub tokenizer.json files are damaged
                raise
    if tok is None and "tokenizer.model" in fetched:
        tok = _from_spm(fetched["tokenizer.model"], name)
        bos, eos = _special_tokens_beside(fetched["tokenizer.model"].parent)
        tok.bos_token, tok.eos_token = bos or tok.bos_token, eos or tok.eos_token
    if tok is None:
        raise DataError(f"hub repository {name!r} has neither tokenizer.json nor tokenizer.model")
    tok.name_or_path = name
    return tok
