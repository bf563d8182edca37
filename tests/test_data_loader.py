"""The training loader and eval batches: shapes, values, exact resume, held-out, processes, errors."""

import json
import time

import numpy as np
import pytest

from bitnet_jax.config import Config, ConfigError, DataConfig, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
from bitnet_jax.data import DataError, build_eval_batches, build_train_loader, load_tokenizer
from bitnet_jax.data.documents import DocumentStream
from bitnet_jax.data.make_fineweb_fixture import write_fixture
from bitnet_jax.data.sources import source_spec


@pytest.fixture(scope="module")
def llama(llama_tokenizer_dir):
    return load_tokenizer(TokenizerConfig(name_or_path=str(llama_tokenizer_dir)))


@pytest.fixture(scope="module")
def fineweb_shards(shared_data, tmp_path_factory):
    """Four FineWeb-Edu-shaped parquet files of 2 documents each (6771 LLaMA-2 tokens with BOS/EOS)."""
    out = tmp_path_factory.mktemp("fineweb") / "fw.parquet"
    csv_path = shared_data / "fineweb_edu_text_sample" / "training_data.csv"
    return write_fixture(out, csv_path=csv_path, shards=4, rows=8, row_group_size=1)


def _config(data: DataConfig, *, batch=8, seq_len=64, eval_batches=1, vocab=32000) -> Config:
    return Config(model=ModelConfig(vocab_size=vocab, max_position_embeddings=512),
                  train=TrainConfig(batch_size=batch, seq_len=seq_len),
                  data=data, eval=EvalConfig(batches=eval_batches))


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _shard_indices(state) -> set:
    """Every ``shard_idx`` inside a (nested) datasets state: which file the stream is in."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("shard_idx"), int):
                found.add(node["shard_idx"])
            for v in node.values():
                walk(v)
    walk(state)
    return found


def test_builtin_batches_have_the_promised_shape_and_start_with_bos():
    cfg = Config(data=DataConfig(source="builtin"))
    tok = load_tokenizer(cfg.tokenizer)
    with build_train_loader(cfg, tok) as loader:
        batch = next(loader)
        assert batch.shape == (cfg.train.batch_size, cfg.train.seq_len + 1) and batch.dtype == np.int32
        assert batch[0, 0] == tok.bos_id
        # rows overlap by one token: the last token of a row is the first of the next
        np.testing.assert_array_equal(batch[:-1, -1], batch[1:, 0])
        second = next(loader)
        assert second[0, 0] == batch[-1, -1]
        assert loader.state_dict()["batches"] == 2
        json.dumps(loader.state_dict())


def test_resume_after_7_batches_gives_the_same_next_5_across_files_and_the_wrap(fineweb_shards, llama):
    cfg = _config(DataConfig(source="fineweb_edu", data_files=[str(p) for p in fineweb_shards], repeat=True))
    loader = build_train_loader(cfg, llama)
    reference, states = [], []
    for _ in range(12):
        reference.append(next(loader))
        states.append(loader.state_dict())
    time.sleep(0.2)  # the thread runs ahead; the state must still be the one after batch 12
    assert loader.state_dict() == states[-1]
    loader.close()
    # the continuation crosses file boundaries and the end of the (finite) source
    assert states[6]["position"]["epoch"] == 0 and states[11]["position"]["epoch"] == 1
    crossed = set().union(*(_shard_indices(s["position"]["dataset"]) for s in states[6:]))
    assert len(crossed) >= 2
    for k in (7, 10):
        saved = json.loads(json.dumps(states[k - 1]))  # the state goes through a JSON file
        with build_train_loader(cfg, llama, state=saved) as resumed:
            again = _take(resumed, 12 - k)
            assert resumed.state_dict() == states[-1]
        for a, b in zip(again, reference[k:]):
            np.testing.assert_array_equal(a, b)


def test_resume_on_the_builtin_source_across_epochs():
    cfg = Config(train=TrainConfig(batch_size=16, seq_len=512), model=ModelConfig(max_position_embeddings=512),
                 data=DataConfig(source="builtin"))
    tok = load_tokenizer(cfg.tokenizer)
    with build_train_loader(cfg, tok) as loader:
        reference = _take(loader, 16)
        epochs = loader.state_dict()["position"]["epoch"]
        with build_train_loader(cfg, tok, state=None) as fresh:
            np.testing.assert_array_equal(next(fresh), reference[0])
    assert epochs >= 1
    with build_train_loader(cfg, tok) as loader:
        _take(loader, 9)
        state = loader.state_dict()
    with build_train_loader(cfg, tok, state=state) as resumed:
        for a, b in zip(_take(resumed, 7), reference[9:]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("source", ["builtin", "fineweb_edu"])
def test_resuming_a_resumed_run_one_batch_at_a_time_matches_the_uninterrupted_run(source, fineweb_shards, llama):
    """Each resume saves again within the document it resumed in (small batches, long documents): the
    state it hands on must be the uninterrupted run's, batch after batch, not the epoch's start."""
    if source == "builtin":
        cfg = Config(train=TrainConfig(batch_size=2, seq_len=64), data=DataConfig(source="builtin"))
        tok = load_tokenizer(cfg.tokenizer)
    else:
        cfg = _config(DataConfig(source="fineweb_edu", data_files=[str(p) for p in fineweb_shards], repeat=True),
                      batch=2, seq_len=64)
        tok = llama
    with build_train_loader(cfg, tok) as loader:
        _take(loader, 30)
        reference, states = [], []
        for _ in range(6):
            reference.append(next(loader))
            states.append(loader.state_dict())
    state = states[0]
    for i in range(1, 6):
        with build_train_loader(cfg, tok, state=json.loads(json.dumps(state))) as resumed:
            np.testing.assert_array_equal(next(resumed), reference[i])
            state = resumed.state_dict()
        # The same place in the same document; datasets may encode its own iterator state differently
        # (parquet row-group bookkeeping), which the next resume's batch above checks.
        without_dataset = [{**s, "position": {**s["position"], "dataset": None}} for s in (state, states[i])]
        assert without_dataset[0] == without_dataset[1]


def test_heldout_documents_feed_eval_and_never_training(fineweb_shards, llama):
    cfg = _config(DataConfig(source="fineweb_edu", data_files=[str(p) for p in fineweb_shards]), eval_batches=2)
    docs = [t for t, _ in DocumentStream(source_spec(cfg.data))]
    evals = build_eval_batches(cfg, llama)
    assert len(evals) == 2 and all(e.shape == (8, 65) and e.dtype == np.int32 for e in evals)
    # eval = the leading documents, packed by the same contract
    first = [1] + llama.encode(docs[0]) + [2]
    np.testing.assert_array_equal(evals[0][0], first[:65])
    assert all(np.array_equal(a, b) for a, b in zip(evals, build_eval_batches(cfg, llama)))
    # 2 batches x 8 rows x 64 + 1 = 1025 tokens: documents 0 and 1 (888 + 1207 tokens) are held out
    held = 0
    have = 0
    while have < 2 * 8 * 64 + 1:
        have += len(llama.encode(docs[held])) + 2
        held += 1
    with build_train_loader(cfg, llama) as loader:
        train = next(loader)
    expected = [1] + llama.encode(docs[held]) + [2]
    np.testing.assert_array_equal(train.reshape(-1)[:60], expected[:60])
    train_docs = [t for t, _ in DocumentStream(source_spec(cfg.data), exclude=_heldout_digests(cfg, llama))]
    assert train_docs == docs[held:]


def _heldout_digests(cfg, tok):
    from bitnet_jax.data.heldout import heldout_set

    return heldout_set(cfg, tok, source_spec(cfg.data)).digests


def test_explicit_eval_documents_and_too_few_tokens(fineweb_shards, llama):
    files = [str(p) for p in fineweb_shards]
    cfg = _config(DataConfig(source="fineweb_edu", data_files=files, eval_documents=3))
    with build_train_loader(cfg, llama) as loader:
        assert loader.state_dict()["heldout_sha256"]
    with pytest.raises(DataError, match="evaluation needs"):
        build_eval_batches(_config(DataConfig(source="fineweb_edu", data_files=files, eval_documents=1),
                                   eval_batches=8), llama)
    with pytest.raises(DataError, match="only 8 documents"):
        build_train_loader(_config(DataConfig(source="fineweb_edu", data_files=files, eval_documents=50)), llama)


def test_two_processes_split_batches_and_eval_rows(fineweb_shards, llama):
    cfg = _config(DataConfig(source="fineweb_edu", data_files=[str(p) for p in fineweb_shards]))
    whole = build_eval_batches(cfg, llama)
    halves = [build_eval_batches(cfg, llama, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([halves[0][0], halves[1][0]]), whole[0])
    batches = []
    for i in range(2):
        with build_train_loader(cfg, llama, process_index=i, process_count=2) as loader:
            batches.append(next(loader))
            assert loader.state_dict()["process_index"] == i
    assert batches[0].shape == batches[1].shape == (4, 65)
    assert not np.array_equal(batches[0], batches[1])
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        build_train_loader(cfg, llama, process_index=0, process_count=3)


def test_a_state_from_other_data_or_process_count_is_refused(fineweb_shards, llama):
    cfg = _config(DataConfig(source="fineweb_edu", data_files=[str(p) for p in fineweb_shards]))
    with build_train_loader(cfg, llama) as loader:
        next(loader)
        state = loader.state_dict()
    with pytest.raises(DataError, match="process_count=1.*has 2"):
        build_train_loader(cfg, llama, process_index=0, process_count=2, state=state)
    other = _config(DataConfig(source="fineweb_edu", data_files=[str(fineweb_shards[0])]))
    with pytest.raises(DataError, match="source"):
        build_train_loader(other, llama, state=state)
    explicit = _config(DataConfig(source="fineweb_edu", data_files=[str(p) for p in fineweb_shards], eval_documents=2))
    with build_train_loader(explicit, llama) as loader:
        next(loader)
        state = loader.state_dict()
    with pytest.raises(DataError, match="tokenizer_sha256"):
        build_train_loader(explicit, load_tokenizer(TokenizerConfig(name_or_path="builtin")), state=state)


def test_finite_source_stops_after_the_last_full_batch(fineweb_shards, llama):
    cfg = _config(DataConfig(source="fineweb_edu", data_files=[str(p) for p in fineweb_shards], repeat=False))
    train_docs = [t for t, _ in DocumentStream(source_spec(cfg.data), exclude=_heldout_digests(cfg, llama))]
    tokens = sum(len(ids) for ids in llama.encode_documents(train_docs))
    with build_train_loader(cfg, llama) as loader:
        n = sum(1 for _ in loader)
        with pytest.raises(StopIteration):
            next(loader)
    assert n == (tokens - 1) // (8 * 64) == 11


def test_worker_processes_give_the_same_batches(fineweb_shards, llama):
    files = [str(p) for p in fineweb_shards]
    in_thread = _config(DataConfig(source="fineweb_edu", data_files=files, tokenize_batch=2))
    workers = _config(DataConfig(source="fineweb_edu", data_files=files, tokenize_batch=2, num_workers=2))
    with build_train_loader(in_thread, llama) as a, build_train_loader(workers, llama) as b:
        for x, y in zip(_take(a, 14), _take(b, 14)):
            np.testing.assert_array_equal(x, y)
        assert a.state_dict() == b.state_dict()


def test_bad_data_fails_in_build_not_in_the_thread(fineweb_shards, llama):
    cfg = _config(DataConfig(source="fineweb_edu", text_column="content", data_files=[str(fineweb_shards[0])]))
    with pytest.raises(DataError, match="columns found: text, id"):
        build_train_loader(cfg, llama)
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        build_train_loader(_config(DataConfig(source="fineweb_edu")), llama)
    small = _config(DataConfig(source="fineweb_edu", data_files=[str(fineweb_shards[0])]), vocab=4096)
    with pytest.raises(ConfigError, match="model.vocab_size=32000"):
        build_train_loader(small, llama)


def test_errors_while_streaming_reach_next(tmp_path):
    # a.txt is the held-out set and a2.txt the document checked to follow it, so the bad file is
    # first read by the training stream, in its background thread
    (tmp_path / "a.txt").write_text("x " * 5000, encoding="utf-8")
    (tmp_path / "a2.txt").write_text("y " * 5000, encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"bad \xff byte")
    cfg = Config(train=TrainConfig(batch_size=2, seq_len=32), eval=EvalConfig(batches=1),
                 data=DataConfig(source="local", data_files=[str(tmp_path / "*.txt")], tokenize_batch=1))
    tok = load_tokenizer(cfg.tokenizer)
    with build_train_loader(cfg, tok) as loader:
        with pytest.raises(DataError, match="b.txt is not UTF-8"):
            for _ in range(1000):
                next(loader)


def test_a_malformed_row_deep_in_the_stream_names_the_data_and_what_to_do(tmp_path):
    good = [json.dumps({"text": f"document {i}: " + "word " * 400}) for i in range(6)]
    (tmp_path / "a.jsonl").write_text("\n".join(good) + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(good[:2] + ["{not json"]) + "\n", encoding="utf-8")
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    cfg = Config(train=TrainConfig(batch_size=2, seq_len=32), eval=EvalConfig(batches=1),
                 data=DataConfig(source="local", data_files=files, tokenize_batch=1))
    tok = load_tokenizer(cfg.tokenizer)
    with build_train_loader(cfg, tok) as loader:
        next(loader)  # the first file trains normally
        with pytest.raises(DataError, match=r"reading .*a\.jsonl \(\+1 more files\) failed after \d+ rows of this "
                                            r"epoch, in .*b\.jsonl: ArrowInvalid.*Fix or remove the bad file"):
            for _ in range(1000):
                next(loader)


def test_shipped_fineweb_config_loads_batches_from_the_fixture(shared_data, llama_tokenizer_dir, tmp_path):
    from bitnet_jax import config

    (parquet,) = write_fixture(tmp_path / "fw.parquet", csv_path=shared_data / "fineweb_edu_text_sample" / "training_data.csv")
    cfg = config.load(config.Path(__file__).resolve().parents[1] / "configs" / "fineweb_edu_sample.yaml", [
        f"data.data_files={parquet}", f"tokenizer.name_or_path={llama_tokenizer_dir}"])
    tok = load_tokenizer(cfg.tokenizer)
    assert (cfg.data.source, cfg.model.vocab_size, tok.vocab_size) == ("fineweb_edu", 32000, 32000)
    with build_train_loader(cfg, tok) as loader:
        assert next(loader).shape == (cfg.train.batch_size, cfg.train.seq_len + 1)
    assert [e.shape for e in build_eval_batches(cfg, tok)] == [(16, 257)] * cfg.eval.batches


@pytest.fixture(scope="module")
def long_paragraph_file(shared_data, tmp_path_factory):
    """A txt file of three paragraphs: a FineWeb-Edu document (held out), one paragraph of 200k
    characters of FineWeb-Edu text (13 pieces), and another document."""
    from bitnet_jax.data.make_fineweb_fixture import read_texts

    texts = [" ".join(t.split()) for t in read_texts(shared_data / "fineweb_edu_text_sample" / "training_data.csv")]
    long_doc = " ".join(texts[1:])[:200_000]
    path = tmp_path_factory.mktemp("long") / "long.txt"
    path.write_text("\n\n".join([texts[0], long_doc, texts[-1]]) + "\n", encoding="utf-8")
    return path


def test_resume_inside_a_long_document_continues_bit_for_bit(long_paragraph_file, llama):
    cfg = _config(DataConfig(source="local", data_files=[str(long_paragraph_file)], tokenize_batch=4),
                  batch=4, seq_len=128)
    with build_train_loader(cfg, llama) as loader:
        reference, states = [], []
        for _ in range(60):  # 30k tokens: the first 8 pieces of the long document
            reference.append(next(loader))
            states.append(loader.state_dict())
    inside = [k for k, s in enumerate(states) if s["piece"]["start_char"] > 0 and
              s["skip_tokens"] > s["piece"]["tokens_before"] > 0]
    assert len(inside) > 40 and len({states[k]["piece"]["start_char"] for k in inside}) >= 5
    for k in (inside[0], inside[len(inside) // 2], inside[-4]):
        saved = json.loads(json.dumps(states[k]))
        with build_train_loader(cfg, llama, state=saved) as resumed:
            for i in range(k + 1, k + 4):
                np.testing.assert_array_equal(next(resumed), reference[i])
                assert resumed.state_dict() == states[i]
        # A state saved before pieces existed counts the document's used tokens only: the document is
        # tokenized from its start, the whole pieces dropped, and the batches are the same.
        without_piece = {key: value for key, value in saved.items() if key != "piece"}
        with build_train_loader(cfg, llama, state=without_piece) as resumed:
            np.testing.assert_array_equal(next(resumed), reference[k + 1])
            assert resumed.state_dict() == states[k + 1]


def test_a_state_pointing_past_the_end_of_its_document_is_refused(long_paragraph_file, llama):
    cfg = _config(DataConfig(source="local", data_files=[str(long_paragraph_file)]), batch=4, seq_len=128)
    with build_train_loader(cfg, llama) as loader:
        for _ in range(30):
            next(loader)
        state = loader.state_dict()
    state["piece"] = {"start_char": 10**7, "tokens_before": state["piece"]["tokens_before"]}
    with build_train_loader(cfg, llama, state=state) as resumed:
        with pytest.raises(DataError, match="does not match this data"):
            next(resumed)


_PEAK_RSS_CHILD = """
import json, resource, sys
from bitnet_jax.config import Config, DataConfig, EvalConfig, TokenizerConfig, TrainConfig
from bitnet_jax.data import build_train_loader, load_tokenizer
tok = load_tokenizer(TokenizerConfig(name_or_path="builtin"))
cfg = Config(train=TrainConfig(batch_size=8, seq_len=128), eval=EvalConfig(every=0, batches=0),
             data=DataConfig(source="local", data_files=[sys.argv[1]], tokenize_batch=8))
with build_train_loader(cfg, tok) as loader:
    for _ in range(20):
        next(loader)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def test_loader_memory_does_not_grow_with_the_length_of_a_document(shared_data, tmp_path):
    """Issue 14: each tokenizer call got data.tokenize_batch whole documents (here the one paragraph,
    again every epoch), and the backend's per-token records cost 125-380 bytes a token (about 50-140
    a character): 8 copies of 4 MB took over 1.5 GB more than 8 copies of 0.25 MB. Pieces bound a
    call at pieces.CALL_CHARS characters, whatever the document: what still grows with it is its
    text (a few copies, 1 byte a character here) and its ids (4 bytes a token), well under 32 bytes
    a character."""
    import subprocess
    import sys

    from bitnet_jax.data.make_fineweb_fixture import read_texts

    text = " ".join(" ".join(t.split()) for t in read_texts(shared_data / "fineweb_edu_text_sample" / "training_data.csv"))
    peaks = {}
    for size in (250_000, 4_000_000):
        path = tmp_path / f"one_paragraph_{size}.txt"
        path.write_text((text * (size // len(text) + 1))[:size] + "\n", encoding="utf-8")
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, str(path)], capture_output=True, text=True,
                             check=True, env={**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false"})
        peaks[size] = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks[4_000_000] - peaks[250_000] < 32 * (4_000_000 - 250_000), peaks
