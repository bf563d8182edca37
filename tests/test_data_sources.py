"""Sources and documents: real ``datasets`` streaming over the shared files, and clear errors."""

import json

import pytest

from bitnet_jax.config import ConfigError, DataConfig
from bitnet_jax.console import command
from bitnet_jax.data import DataError
from bitnet_jax.data.builtin import builtin_documents
from bitnet_jax.data.documents import DocumentStream, is_article_title
from bitnet_jax.data.make_fineweb_fixture import COLUMNS, write_fixture
from bitnet_jax.data.sources import describe_source, source_spec


def _docs(data: DataConfig, **kwargs) -> list[str]:
    return [text for text, _ in DocumentStream(source_spec(data), **kwargs)]


def test_builtin_documents_are_pydoc_topics_in_sorted_order():
    from pydoc_data.topics import topics

    docs = _docs(DataConfig(source="builtin"))
    assert docs == [topics[k] for k in sorted(topics)] == list(builtin_documents())
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000


def test_fineweb_parquet_fixture_has_the_real_columns_and_text(shared_data, tmp_path):
    import pyarrow.parquet as pq

    (path,) = write_fixture(tmp_path / "fw.parquet", csv_path=shared_data / "fineweb_edu_text_sample" / "training_data.csv")
    table = pq.read_table(path)
    assert tuple(table.column_names) == COLUMNS and table.num_rows == 150
    docs = _docs(DataConfig(source="fineweb_edu", data_files=[str(path)]))
    assert len(docs) == 150 and docs[0].startswith("The Independent Jane")
    assert docs == table.column("text").to_pylist()


def test_wikitext_raw_lines_become_articles(shared_data):
    raw = shared_data / "wikitext" / "wikitext-2-raw.wiki.test.raw"
    docs = _docs(DataConfig(source="wikitext", data_files=[str(raw)]))
    # 60 articles; two equation lines of the form " = ... = " inside "Constant k filter" also open
    # a document (documented in documents.py), hence 62.
    assert len(docs) == 62
    assert docs[0].startswith(" = Robert Boulter = \n Robert Boulter is an English film")
    assert docs[1].startswith(" = Du Fu = ")
    assert docs[-1].startswith(" = The Hustler ( film ) = ")
    assert all(is_article_title(d.split("\n")[0]) for d in docs)
    assert all(not is_article_title(line) for d in docs for line in d.split("\n")[1:])
    assert all("\r" not in d for d in docs)
    assert sum(len(d.split("\n")) for d in docs) == 2891  # every non-blank line, once


def test_wikitext_hub_shaped_rows_give_the_same_articles(shared_data, tmp_path):
    """Hub rows carry trailing newlines and blank lines; the articles come out identical."""
    raw = shared_data / "wikitext" / "wikitext-2-raw.wiki.test.raw"
    lines = raw.read_bytes().decode("utf-8").split("\r\n")[:300]
    hub_like = tmp_path / "wiki.jsonl"
    with open(hub_like, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps({"text": line + "\n"}) + "\n" + json.dumps({"text": ""}) + "\n")
    plain = tmp_path / "wiki.raw"
    plain.write_text("\n".join(lines), encoding="utf-8")
    a = _docs(DataConfig(source="wikitext", data_files=[str(hub_like)]))
    b = _docs(DataConfig(source="wikitext", data_files=[str(plain)]))
    assert a == b and len(a) == 8


def test_local_txt_paragraphs_jsonl_csv(shared_data, tmp_path):
    docs = _docs(DataConfig(source="local", data_files=[str(shared_data / "tinyshakespeare" / "input.txt")]))
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert len(docs) == 7222
    lines = _docs(DataConfig(source="local", text_unit="line", data_files=[str(shared_data / "tinyshakespeare" / "input.txt")]))
    assert lines[:2] == ["First Citizen:", "Before we proceed any further, hear me speak."]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}", "n": i}) for i in range(5)))
    assert _docs(DataConfig(source="local", text_column="body", data_files=[str(tmp_path / "*.jsonl")])) == [
        f"doc {i}" for i in range(5)]
    (tmp_path / "c.csv").write_text('body,n\n"line one\nline two",1\nplain,2\n')
    assert _docs(DataConfig(source="local", text_column="body", data_files=[str(tmp_path / "c.csv")])) == [
        "line one\nline two", "plain"]


def test_two_processes_read_disjoint_shards_covering_the_data(shared_data, tmp_path):
    paths = write_fixture(tmp_path / "fw.parquet", csv_path=shared_data / "fineweb_edu_text_sample" / "training_data.csv",
                          shards=4, rows=40)
    data = DataConfig(source="fineweb_edu", data_files=[str(tmp_path / "*.parquet")])
    every = _docs(data)
    p0, p1 = _docs(data, process_index=0, process_count=2), _docs(data, process_index=1, process_count=2)
    assert len(paths) == 4 and len(p0) == len(p1) == 20
    assert not set(p0) & set(p1) and sorted(p0 + p1) == sorted(every)
    raw = shared_data / "wikitext" / "wikitext-2-raw.wiki.test.raw"
    wiki = DataConfig(source="wikitext", data_files=[str(raw)])
    w0, w1 = _docs(wiki, process_index=0, process_count=2), _docs(wiki, process_index=1, process_count=2)
    assert w0 == _docs(wiki)[0::2] and w1 == _docs(wiki)[1::2]


def test_describe_lists_files_with_sizes_and_sha256(shared_data):
    raw = shared_data / "wikitext" / "wikitext-2-raw.wiki.test.raw"
    desc = describe_source(source_spec(DataConfig(source="wikitext", data_files=[str(raw)])))
    (f,) = desc["files"]
    assert f["bytes"] == 1_290_547
    assert f["sha256"] == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
    hub = describe_source(source_spec(DataConfig(source="fineweb_edu")))
    assert (hub["hf_path"], hub["hf_name"], hub["split"]) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")


# --------------------------------------------------------------------------- bad input

def test_missing_file_and_empty_glob_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        source_spec(DataConfig(source="local", data_files=[str(tmp_path / "missing.txt")]))
    assert isinstance(e.value, ConfigError)
    with pytest.raises(DataError, match="matches no files"):
        source_spec(DataConfig(source="local", data_files=[str(tmp_path / "*.parquet")]))
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(DataError, match="unknown format .docx"):
        source_spec(DataConfig(source="local", data_files=[str(tmp_path / "x.docx")]))


def test_missing_text_column_names_the_columns_found(shared_data, tmp_path):
    (path,) = write_fixture(tmp_path / "fw.parquet", csv_path=shared_data / "fineweb_edu_text_sample" / "training_data.csv", rows=3)
    with pytest.raises(DataError, match=r"'content' is not a column .* columns found: text, id, dump, url"):
        _docs(DataConfig(source="fineweb_edu", text_column="content", data_files=[str(path)]))


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(DataError, match="has no documents"):
        _docs(DataConfig(source="local", data_files=[str(tmp_path / "empty.txt")]))


def test_non_utf8_text_names_the_file_and_offset(tmp_path):
    (tmp_path / "a.txt").write_text("fine text\n\nmore\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"b\.txt is not UTF-8 text: byte 0xe9 at offset 3.*iconv"):
        _docs(DataConfig(source="local", data_files=[str(tmp_path / "*.txt")]))


def test_hub_unreachable_says_offline_and_how_to_use_local_files():
    with pytest.raises(DataError) as e:
        _docs(DataConfig(source="fineweb_edu"))
    msg = str(e.value)
    assert "HuggingFaceFW/fineweb-edu" in msg and "HF_HUB_OFFLINE" in msg
    assert "--set data.data_files=" in msg and "make_fineweb_fixture" in msg
    # a whole command, with the interpreter that runs (.venv/bin/python after make train; issue 13, item 11)
    assert f"build a small one with {command('python', '-m', 'bitnet_jax.data.make_fineweb_fixture', 'OUT.parquet')})" in msg


def test_fixture_cli_refuses_impossible_shard_counts_and_prints_a_glob_of_its_own_files(shared_data, tmp_path, capsys):
    from bitnet_jax.data.make_fineweb_fixture import main

    csv_path = str(shared_data / "fineweb_edu_text_sample" / "training_data.csv")
    for shards in ("0", "4"):
        assert main([str(tmp_path / "bad.parquet"), "--csv", csv_path, "--rows", "3", "--shards", shards]) == 2
        assert "give between 1 and the number of documents (3)" in capsys.readouterr().err
    (tmp_path / "unrelated.parquet").write_bytes(b"")
    assert main([str(tmp_path / "fw.parquet"), "--csv", csv_path, "--rows", "4", "--shards", "2"]) == 0
    out = capsys.readouterr().out
    assert f"data.data_files={tmp_path / 'fw-*-of-00002.parquet'}" in out
    assert sorted(p.name for p in tmp_path.glob("fw-*-of-00002.parquet")) == [
        "fw-00000-of-00002.parquet", "fw-00001-of-00002.parquet"]
