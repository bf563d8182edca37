"""Tokenizer loading: LLaMA-2 ids equal SentencePiece's, save/reload, builtin BPE, clear errors."""

import json
import subprocess
import sys

import pytest

from bitnet_jax.config import ConfigError, TokenizerConfig
from bitnet_jax.data import DataError, load_tokenizer


@pytest.fixture(scope="module")
def sp(llama_tokenizer_dir):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def texts_and_sp_ids(sp, shared_texts):
    return shared_texts, sp.encode(shared_texts)


@pytest.mark.parametrize("where", ["tokenizer.model", "hf/tokenizer.json", "."])
def test_llama2_ids_equal_sentencepiece_on_shared_texts(where, llama_tokenizer_dir, texts_and_sp_ids):
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir / where)))
    texts, theirs = texts_and_sp_ids
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    ours = tok.encode_batch(texts)
    mismatched = [t[:60] for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts differ, e.g. {mismatched[:3]}"
    assert sum(map(len, ours)) > 800_000
    assert tok.encode("The quick brown fox") == [450, 4996, 17354, 1701, 29916]
    assert [tok.encode(t) for t in texts[:50]] == ours[:50]  # single and batch encode agree


def test_literal_special_token_text_is_plain_text(llama_tokenizer_dir, sp):
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir)))
    ids = tok.encode("a <s> b </s>")
    assert 1 not in ids and 2 not in ids
    assert ids == sp.encode("a <s> b </s>")
    assert tok.decode(ids) == "a <s> b </s>"


def test_saved_llama_folder_reloads_identically_and_loads_in_transformers(llama_tokenizer_dir, shared_data, tmp_path, shared_texts):
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir / "tokenizer.model")))
    out = tok.save(tmp_path / "tok")
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                               "special_tokens_map.json", "tokenizer.model"}
    again = load_tokenizer(TokenizerConfig(name_or_path=str(out)))
    texts = shared_texts[::7]
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert (again.vocab_size, again.bos_id, again.eos_id) == (32000, 1, 2)

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    sample = texts[:40] + [" Hello world", "a <s> b"]
    assert [hf.encode(t, add_special_tokens=False) for t in sample] == tok.encode_batch(sample)
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2


def test_builtin_tokenizer_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tok = load_tokenizer(TokenizerConfig(name_or_path="builtin", builtin_vocab_size=512))
    assert tok.vocab_size == 512 and (tok.bos_id, tok.eos_id) == (0, 1)
    cached = list((tmp_path / "cache" / "bitnet_jax").glob("builtin_bpe_v512_*/tokenizer.json"))
    assert len(cached) == 1
    text = "def f(x):\n    return x ** 2  # squares é"
    assert tok.decode(tok.encode(text)) == text
    # A fresh process with an empty cache trains the same tokenizer (the BPE trainer is deterministic).
    code = ("from bitnet_jax.config import TokenizerConfig; from bitnet_jax.data import load_tokenizer;"
            "print(load_tokenizer(TokenizerConfig(builtin_vocab_size=512)).describe()['tokenizer_json_sha256'])")
    env_cache = tmp_path / "other_cache"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "XDG_CACHE_HOME": str(env_cache)})
    assert out.stdout.strip() == tok.describe()["tokenizer_json_sha256"]


def test_builtin_saved_folder_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tok = load_tokenizer(TokenizerConfig(builtin_vocab_size=512))
    out = tok.save(tmp_path / "tok")
    again = load_tokenizer(TokenizerConfig(name_or_path=str(out)))
    text = "The <s> builtin corpus\n\tis pydoc text."
    assert again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (0, 1, 512)
    desc = tok.describe()
    assert desc["kind"] == "builtin" and len(desc["files"]["tokenizer.json"]) == 64

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id) == (0, 1)


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "nope" / "tokenizer.model")))
    assert isinstance(e.value, ConfigError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "empty")))
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(DataError, match="SentencePiece"):
        load_tokenizer(TokenizerConfig(name_or_path=str(tmp_path / "junk.model")))


def test_hub_tokenizer_offline_says_so_and_how_to_fix():
    with pytest.raises(DataError) as e:
        load_tokenizer(TokenizerConfig(name_or_path="meta-llama/Llama-2-7b-hf"))
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "tokenizer.name_or_path" in msg


def test_gated_hub_tokenizer_says_to_accept_the_licence_or_use_a_local_copy(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, filename, **kwargs):
        import httpx2

        request = httpx2.Request("GET", f"https://huggingface.co/{repo_id}/resolve/main/{filename}")
        raise GatedRepoError(f"access to {repo_id} is restricted", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(DataError) as e:
        load_tokenizer(TokenizerConfig(name_or_path="meta-llama/Llama-2-7b-hf"))
    msg = str(e.value)
    assert "gated" in msg and "licence" in msg and "tokenizer.name_or_path" in msg
    assert "neither a local path" not in msg


def test_describe_names_files_and_their_sha256(llama_tokenizer_dir):
    desc = load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir))).describe()
    assert desc["kind"] == "sentencepiece" and desc["vocab_size"] == 32000
    assert desc["files"] == {"tokenizer.model": "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"}
    json.dumps(desc)


# --------------------------------------------------------------------------- long documents (pieces.py)

@pytest.fixture(scope="module")
def long_texts(shared_data) -> list[str]:
    """Long real documents, and real text with every kind of spacing around the cuts."""
    from bitnet_jax.data.make_fineweb_fixture import read_texts

    fineweb = read_texts(shared_data / "fineweb_edu_text_sample" / "training_data.csv")
    wiki = (shared_data / "wikitext" / "wikitext-2-raw.wiki.test.raw").read_text(encoding="utf-8")
    shakespeare = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return [
        " ".join(fineweb[:60]),  # one long paragraph
        "\n\n".join(fineweb[60:120]),
        wiki[:150_000],  # " = Title = " lines, " @-@ ", runs of spaces and newlines
        shakespeare[:150_000],
        "  leading and trailing spaces " + fineweb[0] + "   \n  ",
        " ".join(w + " " * (i % 4) for i, w in enumerate(fineweb[1].split())),  # runs of 1-4 spaces
        "literal \u2581 pieces\u2581 next to\u2581\u2581 spaces \u2581" * 40 + fineweb[2],
        "nbsp\u00a0and ideographic\u3000spaces, tabs\t\tand e\u0301 combining marks " * 60,
    ]


def _assert_only_exact_cuts(text, pieces, max_chars):
    assert len(pieces) >= len(text) // max_chars and all(len(p.text) <= max_chars for p in pieces)
    assert all(text[p.start] == " " and not text[p.start - 1].isspace() for p in pieces[1:])


@pytest.mark.parametrize("where", ["tokenizer.model", "hf/tokenizer.json", "builtin"])
def test_long_documents_encoded_piece_by_piece_give_the_whole_documents_ids(where, llama_tokenizer_dir, long_texts):
    from bitnet_jax.data.pieces import split_document

    name = "builtin" if where == "builtin" else str(llama_tokenizer_dir / where)
    tok = load_tokenizer(TokenizerConfig(name_or_path=name))
    assert tok.split_rule.exact, tok.split_rule.reason
    for text in long_texts:
        pieces = list(split_document(text, tok.split_rule, max_chars=100))  # thousands of cuts
        _assert_only_exact_cuts(text, pieces, 100)
        ids = [i for batch in tok.encode_batch([p.text for p in pieces]) for i in batch]
        assert ids == tok.encode(text), f"pieces of {text[:40]!r} encode differently"
    # the loader's path, with the real piece size: [BOS] + the whole document's ids + [EOS]
    doc = long_texts[0]
    assert len(list(tok.pieces(doc))) > 10
    (ids,) = tok.encode_documents([doc])
    assert ids.tolist() == [tok.bos_id] + tok.encode(doc) + [tok.eos_id]


def test_long_document_pieces_give_sentencepieces_ids(sp, llama_tokenizer_dir, long_texts):
    tok = load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir)))
    (ids,) = tok.encode_documents([long_texts[0]])
    assert ids.tolist() == [1] + sp.encode(long_texts[0]) + [2]


def test_pieces_resume_at_a_pieces_start_and_lose_no_text(llama_tokenizer_dir, long_texts):
    from bitnet_jax.data.pieces import split_document

    tok = load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir)))
    text = long_texts[5]
    pieces = list(split_document(text, tok.split_rule, max_chars=300))
    assert pieces[0].first and pieces[-1].last and not any(p.first or p.last for p in pieces[1:-1])
    # SentencePiece-style: a piece after a cut is encoded without its first space (the dummy prefix)
    assert "".join((" " if p.start else "") + p.text for p in pieces) == text
    for k in (1, len(pieces) // 2, len(pieces) - 1):
        assert list(split_document(text, tok.split_rule, start=pieces[k].start, max_chars=300)) == pieces[k:]
    with pytest.raises(ValueError, match="cannot start at character"):
        next(split_document(text, tok.split_rule, start=len(text)))


def test_a_long_stretch_without_spaces_is_cut_at_the_limit():
    from bitnet_jax.data.pieces import SplitRule, split_document

    text = "x" * 250 + " tail"
    pieces = list(split_document(text, SplitRule(drop_space=True, exact=True, reason=""), max_chars=100))
    assert [(p.start, p.text) for p in pieces] == [(0, "x" * 100), (100, "x" * 100), (200, "x" * 50 + " tail")]


def test_cuts_are_exact_only_for_the_pipelines_where_that_is_proven(llama_tokenizer_dir):
    from bitnet_jax.data.pieces import split_rule

    llama = json.loads(load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir))).backend.to_str())
    builtin = json.loads(load_tokenizer(TokenizerConfig(name_or_path="builtin")).backend.to_str())
    assert split_rule(llama).exact and split_rule(llama).drop_space
    assert split_rule(builtin).exact and not split_rule(builtin).drop_space

    def changed(pipeline, path, value):
        out = json.loads(json.dumps(pipeline))
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return split_rule(out)

    joined = changed(llama, ("model", "vocab", "a\u2581b"), 32000)
    assert not joined.exact and "'a\u2581b'" in joined.reason
    nfkc = changed(llama, ("normalizer", "normalizers"), [{"type": "NFKC"}] + llama["normalizer"]["normalizers"])
    assert not nfkc.exact and nfkc.drop_space  # cut the same way, ids not guaranteed
    assert not changed(llama, ("model", "type"), "Unigram").exact
    assert not changed(llama, ("model", "dropout"), 0.1).exact
    added = changed(builtin, ("added_tokens",), builtin["added_tokens"] + [{"content": "hello world", "special": False}])
    assert not added.exact and "hello world" in added.reason
    assert not changed(builtin, ("normalizer",), {"type": "NFC"}).exact
