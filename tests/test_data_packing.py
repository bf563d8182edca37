"""The packing contract: [BOS] ids [EOS] documents, concatenated, rows overlapping by one token."""

import numpy as np
import pytest

from bitnet_jax.data.packing import Packer, rows_from_stream, stream_tokens


def test_rows_overlap_by_exactly_one_token():
    tokens = np.arange(100, dtype=np.int32)
    rows = rows_from_stream(tokens, seq_len=4, rows=3)
    assert rows.dtype == np.int32 and rows.shape == (3, 5)
    np.testing.assert_array_equal(rows, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]])
    with pytest.raises(ValueError, match="need 13 tokens"):
        rows_from_stream(tokens[:12], seq_len=4, rows=3)


def test_packer_cuts_batches_across_documents_and_tracks_the_head():
    packer = Packer(seq_len=3)
    docs = [np.array([1, 10, 11, 2], np.int32), np.array([1, 20, 2], np.int32), np.array([1, 30, 31, 32, 2], np.int32)]
    for i, d in enumerate(docs):
        packer.push(d, f"doc{i}")
    assert packer.available == 12 and packer.can_take(2) and not packer.can_take(4)
    first = packer.take(2)
    np.testing.assert_array_equal(first, [[1, 10, 11, 2], [2, 1, 20, 2]])
    # the next row starts at the last token of the batch: doc1's final token (index 2)
    assert packer.head() == ("doc1", 2)
    second = packer.take(1)
    np.testing.assert_array_equal(second, [[2, 1, 30, 31]])
    assert packer.head() == ("doc2", 2)
    assert packer.available == 3 and not packer.can_take(1)


def test_packer_skip_resumes_inside_a_document():
    full = Packer(seq_len=2)
    resumed = Packer(seq_len=2)
    doc = np.arange(1, 12, dtype=np.int32)
    full.push(doc, "d")
    full.take(2)
    pos, used = full.head()
    resumed.push(doc, pos)
    resumed.skip(used)
    np.testing.assert_array_equal(full.take(3), resumed.take(3))
    with pytest.raises(ValueError, match="does not match"):
        Packer(2).skip(3)


def test_packed_rows_follow_the_stream_and_need_one_token_more_than_they_consume():
    docs = [np.array([1, 5, 2], np.int32), np.array([1, 6, 7, 2], np.int32)]
    packer = Packer(seq_len=3)
    for i, d in enumerate(docs):
        packer.push(d, i)
    assert not packer.can_take(3)  # 3 rows need 3 * 3 + 1 = 10 tokens; there are 7
    np.testing.assert_array_equal(packer.take(2), [[1, 5, 2, 1], [1, 6, 7, 2]])
    np.testing.assert_array_equal(rows_from_stream(stream_tokens(docs, 7), seq_len=3, rows=2),
                                  [[1, 5, 2, 1], [1, 6, 7, 2]])


def test_stream_tokens_takes_the_head_of_the_concatenated_documents():
    docs = [np.array([1, 5, 2], np.int32), np.array([1, 6, 7, 2], np.int32)]
    np.testing.assert_array_equal(stream_tokens(docs, 5), [1, 5, 2, 1, 6])
    np.testing.assert_array_equal(stream_tokens(docs, 50), [1, 5, 2, 1, 6, 7, 2])
