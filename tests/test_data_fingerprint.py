"""dataset_fingerprint.json and the FineWeb-Edu fixture CLI."""

import hashlib
import json

import numpy as np

from bitnet_jax.config import Config, DataConfig, EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
from bitnet_jax.data import build_train_loader, load_tokenizer, make_fineweb_fixture, write_fingerprint
from bitnet_jax.data.documents import DocumentStream
from bitnet_jax.data.sources import source_spec


def test_fingerprint_describes_files_tokenizer_and_first_1000_ids(shared_data, llama_tokenizer_dir, tmp_path):
    out = tmp_path / "fw.parquet"
    assert make_fineweb_fixture.main([str(out), "--rows", "20",
                                      "--csv", str(shared_data / "fineweb_edu_text_sample" / "training_data.csv")]) == 0
    cfg = Config(model=ModelConfig(vocab_size=32000, max_position_embeddings=512),
                 train=TrainConfig(batch_size=4, seq_len=256), eval=EvalConfig(batches=1),
                 tokenizer=TokenizerConfig(name_or_path=str(llama_tokenizer_dir)),
                 data=DataConfig(source="fineweb_edu", data_files=[str(out)]))
    tok = load_tokenizer(cfg.tokenizer)
    path = tmp_path / "run" / "dataset_fingerprint.json"
    written = write_fingerprint(path, cfg, tok)
    data = json.loads(path.read_text())
    assert data == written

    (f,) = data["source"]["files"]
    assert f["bytes"] == out.stat().st_size and f["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert data["tokenizer"]["vocab_size"] == 32000 and data["tokenizer"]["bos_id"] == 1
    assert data["tokenizer"]["files"]["tokenizer.model"].startswith("9e556afd")

    ids = np.array(data["first_token_ids"], dtype=np.int32)
    assert ids.shape == (1000,)
    assert data["first_token_ids_sha256"] == hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()
    # they are the training stream: what the loader's rows hold, after the held-out documents
    with build_train_loader(cfg, tok) as loader:
        batch = next(loader)
    stream = np.concatenate([batch[0]] + [row[1:] for row in batch[1:]])
    np.testing.assert_array_equal(ids, stream[:1000])
    held = data["heldout"]["documents"]
    docs = [t for t, _ in DocumentStream(source_spec(cfg.data))]
    assert ids[:50].tolist() == ([1] + tok.encode(docs[held]))[:50]
    assert write_fingerprint(tmp_path / "again.json", cfg, tok) == written


def test_a_resumed_run_reuses_unchanged_hashes_and_reports_changed_data(tmp_path, capsys, monkeypatch):
    from bitnet_jax.data import sources

    corpus = tmp_path / "a.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: " + "some words " * 50 for i in range(40)), encoding="utf-8")
    cfg = Config(train=TrainConfig(batch_size=2, seq_len=32), eval=EvalConfig(batches=1),
                 data=DataConfig(source="local", data_files=[str(corpus)], text_unit="paragraph"))
    tok = load_tokenizer(cfg.tokenizer)
    path = tmp_path / "run" / "dataset_fingerprint.json"
    first = write_fingerprint(path, cfg, tok)
    assert first["source"]["files"][0]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()

    def no_hashing(p):
        raise AssertionError(f"{p} was hashed again")

    monkeypatch.setattr(sources, "file_sha256", no_hashing)
    assert write_fingerprint(path, cfg, tok) == first  # the resume: same data, nothing re-read
    assert "warning" not in capsys.readouterr().err

    monkeypatch.undo()
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("\n\none more paragraph")
    changed = write_fingerprint(path, cfg, tok)
    assert changed["source"]["files"][0]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    err = capsys.readouterr().err
    assert "the data differs from what this run trained on until now (data files" in err
