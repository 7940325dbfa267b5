"""Data pipeline: shards equal direct tokenization (pieces, workers, shard boundaries), dtypes, JSONL, globs, the
embedded corpus, the course's sliding-window dataset, packed sampling, deterministic batches and split, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.training.data import (Batches, PackedBatches, SlidingWindowDataset, TokenShards, builtin_documents,
                          read_documents, token_dtype, tokenize_to_shards, train_val_split)
from lmforge.errors import DataError
from lmforge.tokenizers.bpe import Tokenizer
from tests.conftest import data_file


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.from_gpt2_files(data_file("gpt2/encoder.json"), data_file("gpt2/vocab.bpe"))


@pytest.fixture(scope="module")
def small_tok():
    return Tokenizer.train([data_file("the-verdict.txt")], 300, progress=False)


def test_verdict_shards_equal_direct_encoding_across_pieces_workers_and_shards(gpt2, tmp_path):
    path = data_file("the-verdict.txt")
    text = path.read_text(encoding="utf-8")
    want = gpt2.encode(text) + [50256]
    assert len(want) == 5146  # 5,145 GPT-2 tokens + EOS
    pieces = list(read_documents([path], chunk_chars=500))
    assert len(pieces) > 20 and [last for _, last in pieces].count(True) == 1
    assert "".join(p for p, _ in pieces) == text
    a = tokenize_to_shards(pieces, gpt2, tmp_path / "a", progress=False)
    b = tokenize_to_shards(read_documents([path], chunk_chars=300), gpt2, tmp_path / "b", shard_tokens=1000,
                           num_workers=2, progress=False)
    assert a.numpy().tolist() == want and b.numpy().tolist() == want
    assert len(b.manifest["shards"]) == 6 and b.dtype == np.uint16 and a.manifest["num_documents"] == 1
    assert b.slice(990, 1010).tolist() == want[990:1010]  # across a shard boundary
    assert (tmp_path / "b" / "shard_00000.bin").stat().st_size == 2000  # uint16 on disk
    # the course's first window (ch02: max_length=4, stride=1)
    ds = SlidingWindowDataset(TokenShards(tmp_path / "b"), max_length=4, stride=1)
    x, y = ds[0]
    assert x.tolist() == [40, 367, 2885, 1464] and y.tolist() == [367, 2885, 1464, 1807]


def test_token_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


class WideTokenizer:
    """A tokenizer with ids above 65,535 (as Llama 3's 128K vocabulary has): one id per character."""

    vocab_size = 100_000
    eos_token_id = 99_999

    def encode(self, text, allowed_special=(), disallowed_special=()):
        return [70_000 + ord(c) % 1000 for c in text]


def test_uint32_shards_and_jsonl_glob(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hi", "id": 1}) + "\n\n" + json.dumps({"text": "yo"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "z"}) + "\n")
    sh = tokenize_to_shards(read_documents([str(tmp_path / "*.jsonl")]), WideTokenizer(), tmp_path / "s",
                            progress=False)
    eos = 99_999
    assert sh.dtype == np.uint32 and sh.manifest["num_documents"] == 3
    f = lambda s: [70_000 + ord(c) for c in s]  # noqa: E731
    assert sh.numpy().tolist() == f("hi") + [eos] + f("yo") + [eos] + f("z") + [eos]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: no 'text' field"):
        list(read_documents([tmp_path / "bad.jsonl"]))


def test_builtin_corpus_documents_are_separated_by_eos(small_tok, tmp_path):
    docs = builtin_documents()[:30]
    sh = tokenize_to_shards(docs, small_tok, tmp_path / "s", progress=False)
    ids = sh.numpy()
    eos = small_tok.eos_token_id
    assert int((ids == eos).sum()) == 30 and ids[-1] == eos
    first_end = int(np.argmax(ids == eos))
    assert small_tok.decode(ids[:first_end].tolist()) == docs[0]
    assert sum(1 for _ in read_documents(["builtin"])) == len(builtin_documents())


def test_bad_input(small_tok, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(read_documents([tmp_path / "missing.txt"]))
    with pytest.raises(DataError, match="matches no files"):
        list(read_documents([str(tmp_path / "*.txt")]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        tokenize_to_shards(read_documents([tmp_path / "empty.txt"]), small_tok, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_documents([tmp_path / "latin1.txt"]))
    with pytest.raises(DataError, match="not a token-shard directory"):
        TokenShards(tmp_path)
    with pytest.raises(DataError, match="too few"):
        PackedBatches(np.arange(10), 2, 16)


def test_sliding_window_matches_the_course_loop():
    toks = list(range(1000, 1100))
    for max_length, stride in [(4, 1), (8, 8), (16, 5)]:
        ds = SlidingWindowDataset(np.array(toks), max_length, stride)
        course_x, course_y = [], []
        for i in range(0, len(toks) - max_length, stride):  # GPTDatasetV1 of the course
            course_x.append(toks[i:i + max_length])
            course_y.append(toks[i + 1:i + max_length + 1])
        assert len(ds) == len(course_x)
        assert [ds[i][0].tolist() for i in range(len(ds))] == course_x
        assert [ds[i][1].tolist() for i in range(len(ds))] == course_y


def test_batches_shuffle_deterministically_per_epoch():
    ds = SlidingWindowDataset(np.arange(200), 4, 4)  # 49 windows
    b = Batches(ds, 4, shuffle=True, drop_last=True, seed=7)
    assert len(b) == 12
    epoch0 = torch.cat([b(i)["input_ids"][:, 0] for i in range(12)])
    epoch1 = torch.cat([b(i)["input_ids"][:, 0] for i in range(12, 24)])
    assert len(set(epoch0.tolist())) == 48 and not torch.equal(epoch0, epoch1)
    again = Batches(ds, 4, shuffle=True, drop_last=True, seed=7)
    assert torch.equal(again(13)["input_ids"], b(13)["input_ids"])
    val = Batches(ds, 10)  # in order, last batch partial
    assert len(val) == 5 and val[4]["input_ids"].shape == (9, 4) and val[0]["input_ids"][0, 0] == 0


def test_packed_batches_are_reproducible_and_shifted():
    toks = np.arange(5000) % 977
    pb = PackedBatches(toks, 3, 16, seed=1)
    a, b = pb(5), PackedBatches(toks, 3, 16, seed=1)(5)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], pb(6)["input_ids"])
    assert a["input_ids"].shape == (3, 16) and torch.equal(a["labels"][:, :-1], a["input_ids"][:, 1:])
    starts = [int(pb(i)["input_ids"][r, 0]) for i in range(50) for r in range(3)]
    assert len(set(starts)) > 100  # random offsets, not a fixed grid


def test_split_is_deterministic_and_disjoint(tmp_path, small_tok):
    sh = tokenize_to_shards(["a b c " * 200], small_tok, tmp_path / "s", progress=False)
    tr, va = train_val_split(sh, 0.1)
    assert len(tr) + len(va) == len(sh) and len(va) == round(len(sh) * 0.1)
    assert np.array_equal(np.concatenate([tr.numpy(), va.numpy()]), sh.numpy())
    with pytest.raises(DataError, match="val_fraction"):
        train_val_split(sh, 1.0)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_cutting_pieces_never_changes_tokens(tmp_path, pattern):
    rng = np.random.default_rng(0)
    parts = ["word", "Ab", "x", "12345", "'s", ".", ",", "é", " ", "  ", "\n", "\n\n", "\t", " \n", "\r\n"]
    text = "".join(rng.choice(parts, size=3000))
    tok = Tokenizer.train([text], 400, pattern=pattern, progress=False)
    p = tmp_path / "t.txt"
    p.write_bytes(text.encode("utf-8"))
    whole = p.read_text(encoding="utf-8")  # universal newlines, as read_documents reads it
    for chunk in (7, 40, 333):
        pieces = list(read_documents([p], chunk_chars=chunk))
        assert "".join(x for x, _ in pieces) == whole and len(pieces) > 3
        ids = [i for x, _ in pieces for i in tok.encode(x)]
        assert ids == tok.encode(whole), chunk
