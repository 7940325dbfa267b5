"""The batch call shared by every tokenizer: `tok(texts, padding=True, truncation=True, max_length=...)` gives the
ids and attention mask transformers' tokenizer gives on the same files (right padding with the pad/EOS token)."""

from __future__ import annotations

import pytest

from conftest import data_file
from lmforge.errors import TokenizerError
from lmforge.tokenizers import CharTokenizer
from lmforge.tokenizers.bpe import Tokenizer

transformers = pytest.importorskip("transformers")
TEXTS = ["Hello world", "A longer sentence, with punctuation and more words.", "x"]


@pytest.fixture(scope="module")
def gpt2():
    enc, bpe = data_file("gpt2/encoder.json"), data_file("gpt2/vocab.bpe")
    return Tokenizer.from_gpt2_files(enc, bpe), transformers.GPT2TokenizerFast(vocab=str(enc), merges=str(bpe))


@pytest.mark.parametrize("max_length", [4, 9, 64])
def test_batch_call_equals_transformers(gpt2, max_length):
    ours, theirs = gpt2
    theirs.pad_token = theirs.eos_token
    want = theirs(TEXTS, padding=True, truncation=True, max_length=max_length)
    got = ours(TEXTS, padding=True, truncation=True, max_length=max_length)
    assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]
    full = [len(r) for r in ours.encode_batch(TEXTS)]
    assert got.num_truncated == [max(0, n - max_length) for n in full]  # truncation is reported, never silent
    t = ours(TEXTS, padding=True, return_tensors="pt")
    assert tuple(t["input_ids"].shape) == (3, max(full)) and int(t["attention_mask"].sum()) == sum(full)


def test_batch_call_errors_are_one_line(gpt2):
    ours, _ = gpt2
    with pytest.raises(TokenizerError, match="need padding=True"):
        ours(TEXTS, return_tensors="pt")
    with pytest.raises(TokenizerError, match="max_length"):
        ours(TEXTS, truncation=True)
    char = CharTokenizer.train(["abc"])
    assert char("abca")["input_ids"] == char.encode("abca")
