"""One very long single-line document through the training loader (issue 14, item 10).

The loader must hand the tokenizer bounded pieces (``pieces.py``) whatever the document's length,
and the token stream must be the whole document's, as if it had been tokenized in one call. The
pieces are observed where they reach the real tokenizers backend: a wrapper around the backend
records the length of every text it is asked to encode and passes the call on unchanged.
"""

import json

import numpy as np
import pytest

from bitnet_jax.config import Config, DataConfig, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
from bitnet_jax.data import build_train_loader, load_tokenizer
from bitnet_jax.data.packing import rows_from_stream

SEQ_LEN, BATCH = 128, 4
DOCUMENT_CHARS = 300_000  # 18+ pieces of 16k characters, about 80k LLaMA-2 tokens


class _RecordingBackend:
    """The real ``tokenizers.Tokenizer``; every ``encode*`` call's text lengths are appended to ``calls``."""

    def __init__(self, backend):
        self._backend = backend
        self.calls: list[list[int]] = []

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if not name.startswith("encode") or not callable(attr):
            return attr

        def recorded(texts, *args, **kwargs):
            self.calls.append([len(t) for t in texts] if isinstance(texts, (list, tuple)) else [len(texts)])
            return attr(texts, *args, **kwargs)
        return recorded


@pytest.fixture(scope="module")
def one_line_file(shared_data, tmp_path_factory):
    """Tiny Shakespeare with its newlines turned into spaces (blank lines leave runs of two spaces, so
    some cuts fall before a run), repeated up to ``DOCUMENT_CHARS`` characters, as one line; then a
    short paragraph (over a batch of tokens), so the long document's end and EOS are in whole batches.
    Returns the file and its two documents as the loader reads them (the paragraph keeps its newline)."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").replace("\n", " ")
    long_doc = (text * (DOCUMENT_CHARS // len(text) + 1))[:DOCUMENT_CHARS].strip()
    short_doc = text[-6000:].strip()
    path = tmp_path_factory.mktemp("one_line") / "one_line.txt"
    path.write_text(long_doc + "\n\n" + short_doc + "\n", encoding="utf-8")
    return path, [long_doc, short_doc + "\n"]


def _tokenizer(name, llama_tokenizer_dir):
    return load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir) if name == "llama2" else name))


def _config(path, tok, **data) -> Config:
    # Evaluation off: the file's only document would otherwise be held out.
    return Config(model=ModelConfig(vocab_size=max(32000, tok.vocab_size), max_position_embeddings=512),
                  train=TrainConfig(batch_size=BATCH, seq_len=SEQ_LEN), eval=EvalConfig(every=0, batches=0),
                  data=DataConfig(source="local", data_files=[str(path)], repeat=False, **data))


def _all_batches(loader) -> tuple[list[np.ndarray], list[dict]]:
    batches, states = [], []
    for batch in loader:
        batches.append(batch)
        states.append(loader.state_dict())
    return batches, states


@pytest.mark.parametrize("name", ["llama2", "builtin"])
def test_a_long_single_line_reaches_the_tokenizer_in_bounded_pieces_and_keeps_its_ids(name, llama_tokenizer_dir,
                                                                                       one_line_file):
    path, docs = one_line_file
    tok = _tokenizer(name, llama_tokenizer_dir)
    # The unsplit reference: each whole document in one backend call, with the packer's BOS/EOS.
    whole = np.concatenate([[tok.bos_id] + tok.backend.encode(d, add_special_tokens=False).ids + [tok.eos_id]
                            for d in docs]).astype(np.int32)
    cfg = _config(path, tok)  # data.tokenize_batch: the default
    recorder = tok.backend = _RecordingBackend(tok.backend)
    with build_train_loader(cfg, tok) as loader:
        batches, states = _all_batches(loader)

    rows = len(batches) * BATCH
    assert rows == (whole.shape[0] - 1) // SEQ_LEN // BATCH * BATCH  # only the tail short of a batch is dropped
    np.testing.assert_array_equal(np.concatenate(batches), rows_from_stream(whole, SEQ_LEN, rows))

    from bitnet_jax.data.pieces import CALL_CHARS, MAX_PIECE_CHARS

    pieces = [n for call in recorder.calls for n in call]
    assert max(pieces) <= MAX_PIECE_CHARS, f"a text of {max(pieces):,} characters reached the tokenizer"
    assert len(pieces) >= len(docs[0]) / MAX_PIECE_CHARS + 1
    # Nothing is lost at the cuts: LLaMA-2's pieces drop the one space its "▁" prefix stands for.
    dropped = len(pieces) - len(docs) if tok.split_rule.drop_space else 0
    assert sum(pieces) + dropped == sum(map(len, docs))
    for call in recorder.calls:  # one call: at most tokenize_batch pieces, and the call ends past CALL_CHARS
        assert len(call) <= cfg.data.tokenize_batch and sum(call) - call[-1] < CALL_CHARS

    # Resuming inside the document from a saved position continues with the same batches.
    k = len(batches) // 2
    assert states[k]["piece"]["start_char"] > 0
    with build_train_loader(cfg, tok, state=json.loads(json.dumps(states[k]))) as resumed:
        for i in range(k + 1, k + 4):
            np.testing.assert_array_equal(next(resumed), batches[i])
            assert resumed.state_dict() == states[i]


def test_the_long_single_line_gives_the_same_batches_with_worker_processes(llama_tokenizer_dir, one_line_file):
    path, docs = one_line_file
    tok = _tokenizer("llama2", llama_tokenizer_dir)
    whole = np.concatenate([[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs]).astype(np.int32)
    with build_train_loader(_config(path, tok, num_workers=1), tok) as loader:
        batches, _ = _all_batches(loader)
    rows = len(batches) * BATCH
    assert rows == (whole.shape[0] - 1) // SEQ_LEN // BATCH * BATCH
    np.testing.assert_array_equal(np.concatenate(batches), rows_from_stream(whole, SEQ_LEN, rows))


def test_the_long_single_line_has_sentencepieces_own_ids(llama_tokenizer_dir, one_line_file):
    """The cut rule is proven for the converted pipeline; this checks it against SentencePiece itself."""
    spm = pytest.importorskip("sentencepiece")
    _, (text, _) = one_line_file
    tok = _tokenizer("llama2", llama_tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))
    ids = np.concatenate(tok.encode_documents([text]))
    assert len(list(tok.pieces(text))) > 10
    assert ids.tolist() == [tok.bos_id] + sp.encode(text) + [tok.eos_id]
