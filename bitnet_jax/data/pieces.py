"""Long documents cut into pieces whose token ids, concatenated, are the whole document's ids.

Why: what one tokenizer call costs in memory grows with the text it is given. The Rust backend
keeps, for every token, its string, offsets and masks (measured: 40 bytes a token for the LLaMA-2
tokenizer, 125-380 for the builtin byte-level BPE), and a SentencePiece-style pipeline without a
pre-tokenizer runs BPE over the whole text as one word. A batch of ``data.tokenize_batch`` long
documents therefore took gigabytes (issue 14: a 1.1 MB paragraph, repeated by the epochs of a
one-document source, peaked at 8 GB). Cutting documents into pieces of at most ``MAX_PIECE_CHARS``
characters, and bounding the characters of one call (``CALL_CHARS``), bounds that memory for any
document length; the packer then receives a document piece by piece.

Where a cut is exact (the pieces' ids equal the whole document's, proven below and tested on
real text in tests/test_data_tokenizer.py): always before a space that follows a non-space
character, never inside the document's trailing whitespace.

- **Byte-level BPE** (a ``ByteLevel`` pre-tokenizer with its GPT-2 split pattern, no normalizer:
  the builtin tokenizer, GPT-2 style tokenizer.json files). BPE never merges across pre-tokens,
  and every pattern alternative that contains a non-space character continues only with
  non-space characters, so a pre-token always ends between a non-space and the space after it.
  The pattern has no look-behind, so the pre-tokens after the cut are the same in the piece; its
  one look-ahead (``\\s+(?!\\S)``) never looks past the piece's last, non-space, character.
- **SentencePiece-style BPE** (a normalizer that escapes spaces as ``▁`` and prepends one
  ``▁``, optionally squeezing spaces, no pre-tokenizer: LLaMA-2's ``tokenizer.model`` as
  ``spm.py`` converts it, and its tokenizer.json). The piece after a cut is encoded without the
  space it starts with, because the prepended ``▁`` stands for it (with squeezing, the rest of
  the run of spaces is stripped, as the whole text squeezes it into that one ``▁``). BPE over the
  whole text then splits at the cut exactly when no merge can join the characters either side
  of it: merges only ever join neighbours, so the merges on each side are the ones each piece
  makes alone. That holds when no vocabulary piece has a ``▁`` right after another character
  (checked when the tokenizer is loaded; LLaMA-2 has none: its inner ``▁`` are runs of ``▁``).

Any other tokenizer (a Unigram model, whose scores are floating-point sums; extra normalizers;
non-special added tokens) is cut at the same places without that proof: its ids may then differ
from the whole document's by a token at a cut. So may a stretch of more than ``MAX_PIECE_CHARS``
characters without a space (base64, long CJK text), which is cut where the limit falls. Either
way no text is lost, and the cuts depend only on the text, so a resumed run cuts the same.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

T = TypeVar("T")

MAX_PIECE_CHARS = 16_384  # characters of one piece (about 4k tokens of English text)
CALL_CHARS = 1 << 20  # characters of all the texts one tokenizer call gets

_PREFIX = {"type": "Prepend", "prepend": "\u2581"}
_ESCAPE = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_SQUEEZE = [{"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
_SENTENCEPIECE_NORMALIZERS = ([_PREFIX, _ESCAPE], [*_SQUEEZE, _PREFIX, _ESCAPE])


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """How a tokenizer's documents are cut (see the module docstring)."""

    drop_space: bool  # the normalizer prepends "▁": a piece after a cut is encoded without its space
    exact: bool  # the pieces' ids provably equal the whole document's
    reason: str  # why not, when not exact


class Piece(NamedTuple):
    """One piece of a document: ``text`` is what gets encoded, ``start`` the character offset in the
    document where the piece begins (its dropped space included)."""

    text: str
    start: int
    first: bool  # the document's first piece: BOS goes before its ids
    last: bool  # the document's last piece: EOS goes after its ids


def split_rule(pipeline: dict) -> SplitRule:
    """The rule for a tokenizer given as its tokenizer.json content (a dict)."""
    steps = _normalizer_steps(pipeline.get("normalizer"))
    drop_space = _PREFIX in steps
    problem = _model_problem(pipeline["model"]) or _added_tokens_problem(pipeline.get("added_tokens") or [])
    if not problem:
        pre = pipeline.get("pre_tokenizer")
        if _is_byte_level(pre):
            problem = "a normalizer before the byte-level pre-tokenizer" if steps else ""
        elif pre is None and steps in _SENTENCEPIECE_NORMALIZERS:
            joined = [t for t in pipeline["model"]["vocab"] if _joins_across_a_space(t)]
            problem = f"vocabulary pieces join a character to the space after it, e.g. {joined[0]!r}" if joined else ""
        else:
            problem = "neither a byte-level nor a SentencePiece-style BPE pipeline"
    return SplitRule(drop_space=drop_space, exact=not problem, reason=problem)


def _normalizer_steps(normalizer: dict | None) -> list[dict]:
    if normalizer is None:
        return []
    if normalizer.get("type") == "Sequence":
        return [step for inner in normalizer["normalizers"] for step in _normalizer_steps(inner)]
    return [normalizer]


def _model_problem(model: dict) -> str:
    if model.get("type") != "BPE":
        return f"a {model.get('type')} model"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE with dropout or subword affixes"
    if model.get("fuse_unk") and not model.get("byte_fallback"):
        return "BPE fusing unknown characters across the cut"
    return ""


def _added_tokens_problem(added: list[dict]) -> str:
    # Special tokens never match text (``Tokenizer`` sets encode_special_tokens); other added tokens
    # split the text before normalization, so the prepended "▁" would land beside each of them.
    plain = [a["content"] for a in added if not a.get("special")]
    return f"non-special added tokens such as {plain[0]!r}" if plain else ""


def _is_byte_level(pre: dict | None) -> bool:
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _joins_across_a_space(token: str) -> bool:
    return any(token[i] == "\u2581" and token[i - 1] != "\u2581" for i in range(1, len(token)))


def split_document(text: str, rule: SplitRule, start: int = 0,
                   max_chars: int = MAX_PIECE_CHARS) -> Iterator[Piece]:
    """The pieces of ``text`` from character ``start`` on (0, or where an earlier call put a piece).

    Each piece spans at most ``max_chars`` characters. A document of that length or shorter is one
    piece. The cuts depend only on the text from ``start`` on, so a resumed loader that starts at a
    piece's ``start`` gets the same pieces as the run that saved it.
    """
    if not 0 <= start < max(len(text), 1):
        raise ValueError(f"a piece cannot start at character {start} of a {len(text)}-character document")
    last_cut = _content_end(text) - 1  # a cut needs a non-space character after it
    while True:
        if len(text) - start <= max_chars:
            end = len(text)
        else:
            end = _last_cut(text, start, min(start + max_chars, last_cut)) or start + max_chars
        begin = start + 1 if rule.drop_space and start > 0 and text[start] == " " else start
        yield Piece(text[begin:end], start, first=start == 0, last=end == len(text))
        if end == len(text):
            return
        start = end


def _content_end(text: str) -> int:
    """Length of ``text`` without its trailing whitespace (without copying a long text)."""
    end = len(text)
    while end and text[end - 1].isspace():
        end -= 1
    return end


def _last_cut(text: str, start: int, limit: int) -> int | None:
    """The last exact cut in ``(start, limit]``: a space right after a non-space character (nor a
    literal ``▁``, which a SentencePiece-style normalizer cannot tell from an escaped space)."""
    p = text.rfind(" ", start + 1, limit + 1)
    while p > start:
        if not (text[p - 1].isspace() or text[p - 1] == "\u2581"):
            return p
        p = text.rfind(" ", start + 1, p)
    return None


def bounded_batches(items: Iterable[T], max_items: int, max_chars: int = CALL_CHARS,
                    chars: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Consecutive lists of at most ``max_items`` items, each list ending as soon as its items hold
    ``max_chars`` characters (``chars(item)``) or more: the texts of one tokenizer call."""
    it = iter(items)
    for first in it:
        batch, total = [first], chars(first)
        for item in itertools.islice(it, max_items - 1):
            batch.append(item)
            total += chars(item)
            if total >= max_chars:
                break
        yield batch
