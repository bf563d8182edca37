"""The run's tokenizer as a llama.cpp vocabulary: the ``tokenizer.ggml.*`` keys of a GGUF file.

llama.cpp does not run ``tokenizers``; it has tokenizers of its own, chosen and configured by these
keys. Two of them reproduce ours exactly (tests/test_gguf_llama_cpp.py checks the ids on real text):

- ``llama``, llama.cpp's SentencePiece BPE: it splits the text into characters and repeatedly merges
  the adjacent pair whose result is the vocabulary piece with the highest score, with byte fallback
  (``<0x0A>``) for characters outside the vocabulary. Written from a SentencePiece ``tokenizer.model``
  (its pieces, scores and piece types as they are), or from a ``tokenizer.json`` that holds such a
  model converted to BPE (the hub's LLaMA-2 tokenizer): there each piece's score is minus the rank of
  the first merge that makes it, so "highest score first" is "lowest merge rank first", which is
  how ``tokenizers`` applies merges.
- ``gpt2``, llama.cpp's byte-level BPE with the GPT-2 pre-tokenizer regex (``tokenizer.ggml.pre =
  gpt-2``), which is what ``ByteLevel(add_prefix_space=False)`` does (the builtin tokenizer).

BOS as in training: documents were packed as ``[BOS] + ids + [EOS]``, so the file asks llama.cpp to
add BOS to a prompt (``add_bos_token``) and never EOS. Ids the model has beyond the tokenizer's
(``model.vocab_size`` may be larger) become unused ``[PAD<id>]`` pieces: llama.cpp needs one piece per
embedding row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bitnet_jax.config import ConfigError

# gguf.TokenType values; SentencePiece's piece types use the same numbers (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPM_BPE_MODEL = 2
_SPACE = "\u2581"  # SentencePiece's visible space


class VocabError(ConfigError):
    """A tokenizer that llama.cpp cannot reproduce; the message says which kinds it can."""


@dataclasses.dataclass
class GGUFVocab:
    """What a GGUF file says about the tokenizer. ``tokens[i]`` is the text of id ``i``."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]  # a gguf.TokenType per token
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None = None
    scores: list[float] | None = None  # llama: merge priority, higher first
    merges: list[str] | None = None  # gpt2: "left right", lowest rank first
    pre: str | None = None  # gpt2: the pre-tokenizer (regex) llama.cpp applies
    add_space_prefix: bool | None = None  # llama: SentencePiece's dummy prefix

    def write_to(self, writer) -> None:
        """Adds the ``tokenizer.ggml.*`` keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for add, value in ((writer.add_bos_token_id, self.bos_id), (writer.add_eos_token_id, self.eos_id),
                           (writer.add_unk_token_id, self.unk_id)):
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.bos_id is not None)
        writer.add_add_eos_token(False)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def gguf_vocab(tokenizer_dir: str | Path, tok, vocab_size: int) -> GGUFVocab:
    """The vocabulary of a run's ``tokenizer/`` folder (``Tokenizer.save``) for a model with
    ``vocab_size`` embedding rows; ``tok`` is that folder loaded (``load_run_tokenizer``), whose
    BOS/EOS the packer used. Raises ``VocabError`` for a tokenizer llama.cpp would split differently."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.model").is_file():  # saved only when the run's tokenizer came from it
        vocab = _from_sentencepiece(tokenizer_dir / "tokenizer.model")
    else:
        vocab = _from_tokenizer_json(json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")))
    if len(vocab.tokens) != tok.vocab_size:
        raise VocabError(f"{tokenizer_dir} describes {len(vocab.tokens)} tokens but loads as {tok.vocab_size}; "
                         "the tokenizer folder is inconsistent")
    if len(vocab.tokens) > vocab_size:
        raise VocabError(f"the tokenizer in {tokenizer_dir} has {len(vocab.tokens)} tokens but the model only "
                         f"{vocab_size}; this tokenizer does not belong to this model")
    vocab.bos_id, vocab.eos_id = tok.bos_id, tok.eos_id
    _pad(vocab, vocab_size)
    return vocab


def _pad(vocab: GGUFVocab, vocab_size: int) -> None:
    taken = set(vocab.tokens)
    for i in range(len(vocab.tokens), vocab_size):
        name = f"[PAD{i}]"
        while name in taken:  # piece texts must be unique for llama.cpp
            name = f"[{name}]"
        vocab.tokens.append(name)
        vocab.types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(float("-inf"))


# --------------------------------------------------------------------------- SentencePiece

def _from_sentencepiece(path: Path) -> GGUFVocab:
    from bitnet_jax.data.spm import read_model_proto

    proto = read_model_proto(path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    why = []
    if spec.model_type != _SPM_BPE_MODEL:
        why.append("it is not a BPE model (llama.cpp's SentencePiece tokenizer is BPE only)")
    if not spec.byte_fallback:
        why.append("it has no byte fallback (llama.cpp spells unknown characters as <0xNN> pieces)")
    if norm.precompiled_charsmap:
        why.append(f"it normalizes text ({norm.name or 'a character map'}), which llama.cpp's tokenizer does not")
    if norm.remove_extra_whitespaces:
        why.append("it removes repeated spaces, which llama.cpp's tokenizer does not")
    if not norm.escape_whitespaces or spec.treat_whitespace_as_suffix:
        why.append("it does not mark spaces as a ▁ prefix")
    if why:
        raise VocabError(f"{path}: llama.cpp would tokenize text differently from this SentencePiece model: "
                         f"{'; '.join(why)}")
    return GGUFVocab(model="llama", tokens=[p.piece for p in proto.pieces], types=[int(p.type) for p in proto.pieces],
                     scores=[float(p.score) for p in proto.pieces], bos_id=None, eos_id=None,
                     unk_id=spec.unk_id if 0 <= spec.unk_id < len(proto.pieces) else None,
                     add_space_prefix=bool(norm.add_dummy_prefix))


# --------------------------------------------------------------------------- tokenizer.json

def _from_tokenizer_json(data: dict) -> GGUFVocab:
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise VocabError(_unsupported(f"its model is {model.get('type')!r} with subword affixes"
                                      if model.get("type") == "BPE" else f"its model is {model.get('type')!r}"))
    if _byte_level(data.get("pre_tokenizer")):
        return _byte_level_bpe(data, model)
    if model.get("byte_fallback") and _spm_prefix(data) is not None:
        return _spm_bpe(data, model)
    raise VocabError(_unsupported("its pre-tokenizer and normalizer are neither GPT-2's byte-level ones "
                                  "nor SentencePiece's ▁ spaces"))


def _unsupported(why: str) -> str:
    return (f"llama.cpp cannot tokenize like this tokenizer.json ({why}); GGUF export supports SentencePiece "
            "BPE tokenizers (tokenizer.model, or their tokenizer.json conversion, e.g. LLaMA-2) and byte-level "
            "BPE ones (GPT-2 style, e.g. the builtin tokenizer); use --format online or packed instead")


def _byte_level(pre: dict | None) -> bool:
    """GPT-2's pre-tokenizer: ByteLevel with its regex and no added prefix space."""
    if pre is None:
        return False
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return (len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True)
            and not steps[0].get("add_prefix_space", False))


def _spm_prefix(data: dict) -> bool | None:
    """Whether a SentencePiece-style tokenizer.json prepends ▁ to the text (None: it is not one).

    Two shapes exist: normalizer ``[Prepend(▁)], Replace(' ', ▁)`` with no pre-tokenizer (older
    transformers conversions, and ours in data/spm.py), or a non-splitting ``Metaspace``."""
    norm, pre = data.get("normalizer"), data.get("pre_tokenizer")
    if pre is None and norm is not None:
        steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        kinds = [s.get("type") for s in steps]
        replace = [s for s in steps if s.get("type") == "Replace"]
        if (set(kinds) <= {"Prepend", "Replace"} and len(replace) == 1 and replace[0].get("content") == _SPACE
                and replace[0].get("pattern") == {"String": " "} and kinds[-1] == "Replace"
                and all(s.get("prepend") == _SPACE for s in steps if s.get("type") == "Prepend")):
            return "Prepend" in kinds
        return None
    if norm is None and pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE \
            and not pre.get("split", True):
        return pre.get("prepend_scheme", "always") in ("always", "first")
    return None


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    # tokenizers writes merges as ["a", "b"] pairs (>= 0.20) or as "a b" strings (older files).
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges", [])]


def _ordered_tokens(data: dict, model: dict) -> tuple[list[str], dict[int, dict]]:
    """Token texts in id order (the model's vocabulary plus added tokens), and the added tokens by id."""
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    n = max(by_id) + 1 if by_id else 0
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise VocabError(f"the tokenizer's ids are not contiguous (no token for id {missing[0]}); llama.cpp "
                         "needs a piece for every id")
    return [by_id[i] for i in range(n)], added


def _added_type(a: dict) -> int:
    return CONTROL if a.get("special") else USER_DEFINED


def _byte_level_bpe(data: dict, model: dict) -> GGUFVocab:
    tokens, added = _ordered_tokens(data, model)
    types = [_added_type(added[i]) if i in added else NORMAL for i in range(len(tokens))]
    return GGUFVocab(model="gpt2", pre="gpt-2", tokens=tokens, types=types, bos_id=None, eos_id=None,
                     merges=[f"{a} {b}" for a, b in _merge_pairs(model)])


def _spm_bpe(data: dict, model: dict) -> GGUFVocab:
    tokens, added = _ordered_tokens(data, model)
    ids = {t: i for i, t in enumerate(tokens)}
    unk = model.get("unk_token")
    types = []
    for i, t in enumerate(tokens):
        if t == unk:
            types.append(UNKNOWN)
        elif i in added:
            types.append(_added_type(added[i]))
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    pairs = _merge_pairs(model)
    scores = [-float(len(pairs) + i) for i in range(len(tokens))]  # below every merge: never preferred
    for rank, (a, b) in enumerate(pairs):
        i = ids.get(a + b)
        if i is not None and scores[i] < -rank:
            scores[i] = -float(rank)
    return GGUFVocab(model="llama", tokens=tokens, types=types, scores=scores, bos_id=None, eos_id=None,
                     unk_id=ids.get(unk), add_space_prefix=_spm_prefix(data))
