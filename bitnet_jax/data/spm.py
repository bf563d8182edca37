"""SentencePiece ``tokenizer.model`` -> an equivalent ``tokenizers.Tokenizer``.

Why convert instead of running ``sentencepiece``: one backend for every tokenizer (fast batch
encoding that releases the GIL, and a ``tokenizer.json`` that transformers loads), and no runtime
dependency on the ``sentencepiece`` package. The conversion reproduces SentencePiece's own
pipeline, so ids equal ``SentencePieceProcessor.encode`` (checked against the LLaMA-2 model in
tests/test_data_tokenizer.py):

- normalizer: the precompiled character map (if any), extra-space removal (if the model asks for
  it), the dummy-prefix space, and spaces escaped as U+2581;
- BPE models: merges ranked by the score of the piece they produce (SentencePiece merges the pair
  whose result scores highest); Unigram models: the pieces with their scores;
- control pieces (``<s>``, ``</s>``) are special tokens that never match text; byte-fallback pieces
  (``<0x0A>``) cover characters outside the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE, Unigram

from bitnet_jax.data.errors import DataError

# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE_MODEL, _UNIGRAM_MODEL = 2, 1


def _model_proto_class():
    try:  # the sentencepiece package ships the schema; transformers does too (protobuf only)
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except ImportError:
        from transformers.utils import sentencepiece_model_pb2_new as pb2
    return pb2.ModelProto


def read_model_proto(path: str | Path):
    """Parses a SentencePiece ``.model`` file (a protobuf ``ModelProto``)."""
    proto = _model_proto_class()()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # protobuf raises DecodeError, a bare Exception subclass
        raise DataError(f"{path} is not a SentencePiece model file ({e}); give a tokenizer.model, "
                        "a tokenizer.json or a transformers tokenizer folder") from None
    if not proto.pieces:
        raise DataError(f"{path} holds no SentencePiece pieces; it is not a tokenizer.model")
    return proto


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best (highest-scoring) result first."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def tokenizer_from_spm(path: str | Path) -> tuple[Tokenizer, str | None, str | None]:
    """Converts a SentencePiece model. Returns (tokenizer, bos piece or None, eos piece or None)."""
    proto = read_model_proto(path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    unk = spec.unk_piece or "<unk>"
    if spec.model_type == _BPE_MODEL:
        model = BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=_bpe_merges(proto),
                    unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback, dropout=None)
    elif spec.model_type == _UNIGRAM_MODEL:
        model = Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=spec.unk_id,
                        byte_fallback=spec.byte_fallback)
    else:
        raise DataError(f"{path}: SentencePiece model type {spec.model_type} (word/char) is not "
                        "supported; use a BPE or Unigram model, or a tokenizer.json")
    tok = Tokenizer(model)

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # SentencePiece only squeezes spaces, not newlines or tabs
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)

    dec = [decoders.Replace("▁", " ")]
    if spec.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)

    # Control and unknown pieces are special: they never come out of text (encode_special_tokens is
    # set by the caller), and decoding can skip them. User-defined pieces always match whole.
    specials = [AddedToken(p.piece, special=True, normalized=False)
                for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens(specials)
    user = [AddedToken(p.piece, special=False, normalized=False)
            for p in proto.pieces if p.type == _USER_DEFINED]
    if user:
        tok.add_tokens(user)

    def piece(i: int) -> str | None:
        return pieces[i] if 0 <= i < len(pieces) else None

    return tok, piece(spec.bos_id), piece(spec.eos_id)
