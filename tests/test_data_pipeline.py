"""Token shards and the packing loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_texts

from llmstack.data.loader import PackedLoader
from llmstack.data.shards import ShardIndex, iter_docs, token_dtype, write_shards


def test_shards_round_trip_documents(tok, texts, shard_dir):
    idx = ShardIndex.load(shard_dir)
    assert idx.dtype == np.uint16 and token_dtype(70_000) == np.uint32
    docs = [d for arr in idx.arrays("train") + idx.arrays("val") for d in iter_docs(arr, tok.bos_id)]
    assert len(docs) == len(texts)
    decoded = sorted(tok.decode(d[1:].tolist()) for d in docs)
    assert decoded == sorted(texts)
    idx.check_tokenizer(tok)


def test_shards_refuse_another_tokenizer(shard_dir):
    from llmstack.tokenizer import Tokenizer

    other = Tokenizer.train(make_texts(50, seed=9), 300)
    with pytest.raises(ValueError, match="re-run `llmstack tokenize`"):
        ShardIndex.load(shard_dir).check_tokenizer(other)


def test_truncated_shard_is_named(tmp_path, tok, texts):
    write_shards(((str(i), t) for i, t in enumerate(texts)), tok, tmp_path, val_fraction=0.1, progress=False)
    f = tmp_path / "train_000000.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train_000000.bin"):
        ShardIndex.load(tmp_path)


def test_empty_corpus_and_missing_shards(tmp_path, tok):
    with pytest.raises(ValueError, match="empty"):
        write_shards([("a", ""), ("b", "")], tok, tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="llmstack tokenize"):
        ShardIndex.load(tmp_path / "nothing")
    assert not (tmp_path / "x" / "index.json").exists()


def _stream(doc_lengths, bos=0):
    parts = []
    for i, n in enumerate(doc_lengths):
        parts.append(np.concatenate([[bos], np.full(n - 1, i + 1)]))
    return np.concatenate(parts).astype(np.uint16)


def test_rows_start_at_document_boundaries_and_long_docs_are_windowed():
    T = 8
    arr = _stream([3, 4, 20, 5, 9, 2, 6])
    loader = PackedLoader([arr], 0, T, 1, shuffle=False)
    for segs in loader.rows:
        assert sum(n for _, _, n in segs) == T + 1
        shard, start, _ = segs[0]
        # a row starts at a bos, or at a row-aligned window inside a long document
        doc_start = max(i for i in np.flatnonzero(arr == 0) if i <= start)
        assert arr[start] == 0 or (start - doc_start) % (T + 1) == 0
    # the long document (id 3, 20 tokens) gives two full windows of its own
    full = [segs for segs in loader.rows if len(segs) == 1 and arr[segs[0][1] + 1] == 3]
    assert len(full) == 2


def test_ranks_partition_what_one_process_sees_and_resume_is_exact():
    arr = _stream([7, 30, 12, 9, 50, 4, 16, 21, 8, 13] * 5)
    single = PackedLoader([arr], 0, 8, 2, seed=3)
    r0 = PackedLoader([arr], 0, 8, 1, rank=0, world_size=2, seed=3)
    r1 = PackedLoader([arr], 0, 8, 1, rank=1, world_size=2, seed=3)
    for _ in range(len(single) * 2 + 1):  # across an epoch boundary (reshuffle)
        x, y = single.next_batch()
        assert torch.equal(x, torch.cat([r0.next_batch()[0], r1.next_batch()[0]]))
        assert torch.equal(x[:, 1:], y[:, :-1])
    resumed = PackedLoader([arr], 0, 8, 2, seed=3)
    resumed.load_state_dict(single.state_dict())
    assert torch.equal(single.next_batch()[0], resumed.next_batch()[0])
    with pytest.raises(ValueError, match="seq_len was 8, is 4"):
        PackedLoader([arr], 0, 4, 2, seed=3).load_state_dict(single.state_dict())


def test_too_little_data_for_a_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader([_stream([5, 5])], 0, 8, 4)
