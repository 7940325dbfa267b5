"""Byte-level BPE: training exactness, GPT-2 compatibility with tiktoken, the two encode paths, decode, bad input."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import data_file
from lmforge.errors import DataError, LmforgeError, TokenizerError
from lmforge.tokenizers.bpe import (
    GPT2_PATTERN, GPT4_PATTERN, Tokenizer, bytes_to_unicode, count_pretokens, train_bpe, unicode_to_token,
)
from helpers import train_bpe_naive

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def gpt2_files():
    return data_file("gpt2/encoder.json"), data_file("gpt2/vocab.bpe")


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return Tokenizer.from_gpt2_files(*gpt2_files)


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_files):
    """tiktoken's own gpt2 encoding, built offline from the very same files (never `tiktoken.get_encoding`)."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    encoder_json, vocab_bpe = gpt2_files
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    return tiktoken.Encoding("gpt2-offline", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope="module")
def small_tok():
    text = (Path(__file__).read_text(encoding="utf-8") + "\n") * 2
    return Tokenizer.train([text, "naïve café — 日本語のテキスト 🙂🙂 <|endoftext|> done"], 400,
                           special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)


# ------------------------------------------------------------------------------------------------ training
def _reference_merges(path: Path) -> list[tuple[bytes, bytes]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        a, b = line.split(" ")
        out.append((unicode_to_token(a), unicode_to_token(b)))
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_training_matches_reference_exactly(workers):
    corpus = data_file("bpe_reference/corpus.en")
    ref_merges = _reference_merges(data_file("bpe_reference/train-bpe-reference-merges.txt"))
    ref_vocab = json.loads(data_file("bpe_reference/train-bpe-reference-vocab.json").read_text(encoding="utf-8"))
    tok = Tokenizer.train([corpus], 500, special_tokens=["<|endoftext|>"], num_workers=workers, progress=False)
    assert tok.merges == ref_merges  # same merges, same order (tie rule included)
    ref_set = {k.encode() if k == "<|endoftext|>" else unicode_to_token(k) for k in ref_vocab}
    assert len(ref_set) == 500
    assert set(tok.vocab.values()) == ref_set
    assert tok.vocab_size == 500 and tok.special_tokens == {"<|endoftext|>": 499}


def test_tie_rule_prefers_lexicographically_greater_pair():
    # ("a","b") and ("c","d") both occur 3 times: merge ("c","d") first; then ("a","b")
    assert train_bpe({b"ab": 3, b"cd": 3}, 2, progress=False) == [(b"c", b"d"), (b"a", b"b")]
    # after (b,c), the pairs (a,b) and (a,bc) both occur twice; a prefix sorts first, so (a,bc) is greater
    counts = {b"ab": 2, b"abc": 2, b"bc": 10}
    assert train_bpe(counts, 2, progress=False) == [(b"b", b"c"), (b"a", b"bc")] == train_bpe_naive(counts, 2)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(alphabet="abcde ", min_size=1, max_size=8).map(str.encode),
                       st.integers(1, 20), min_size=1, max_size=25), st.integers(1, 40))
def test_incremental_trainer_equals_naive_recount(counts, n):
    """The heap + pair index trainer gives the textbook result, merge for merge, on random small corpora."""
    assert train_bpe(counts, n, progress=False) == train_bpe_naive(counts, n)


def test_incremental_equals_naive_on_real_text():
    text = data_file("the-verdict.txt").read_text(encoding="utf-8")
    counts = count_pretokens([text], GPT2_PATTERN)
    assert train_bpe(counts, 150, progress=False) == train_bpe_naive(counts, 150)


def test_special_tokens_are_never_merged_across():
    text = "ab<|endoftext|>" * 30 + "ab"
    tok = Tokenizer.train([text], 260, special_tokens=["<|endoftext|>"], progress=False)
    assert tok.merges == [(b"a", b"b")]  # nothing else is mergeable: the corpus ran out before vocab_size
    assert tok.vocab_size == 258 and tok.special_tokens == {"<|endoftext|>": 257}
    assert tok.encode(text, allowed_special="all")[:3] == [256, 257, 256]
    # without the split, "b<" and "|" pieces would be frequent pairs
    counts = count_pretokens([text], GPT2_PATTERN, ["<|endoftext|>"])
    assert set(counts) == {b"ab"}


def test_documents_are_not_merged_across():
    counts = count_pretokens(["hello", "world"], GPT2_PATTERN)
    assert counts == Counter({b"hello": 1, b"world": 1})


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_parallel_pretokenization_equals_serial(pattern):
    text = data_file("war_and_peace/warpeace_input.txt").read_text(encoding="utf-8")[:1_200_000]  # > 1 MiB
    serial = count_pretokens([text], pattern, num_workers=1)
    parallel = count_pretokens([text], pattern, num_workers=2, progress=False)
    assert parallel == serial
    if pattern != GPT2_PATTERN:
        return
    docs = text.split("\r\n\r\n")  # thousands of small documents travel to the workers in batches
    assert count_pretokens(docs, pattern, num_workers=2, progress=False) == count_pretokens(docs, pattern,
                                                                                           num_workers=1)


def test_gpt4_pattern_option(small_tok):
    tok = Tokenizer.train(["x = 1234567\n\n\nhello world's\n"] * 20, 270, pattern="gpt4", progress=False)
    assert tok.pattern == GPT4_PATTERN
    assert tok._re.findall("12345 it's\n\n") == ["123", "45", " it", "'s", "\n\n"]
    assert tok.decode(tok.encode("x = 1234567\n")) == "x = 1234567\n"


def test_train_ids_layout_and_defaults(small_tok):
    tok = small_tok
    assert tok.vocab_size == 400
    assert [tok.vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert tok.special_tokens == {"<|endoftext|>": 398, "<|pad|>": 399}
    assert tok.bos_token_id == tok.eos_token_id == 398 and tok.pad_token_id is None
    for k, (a, b) in enumerate(tok.merges):
        assert tok.vocab[256 + k] == a + b


# ------------------------------------------------------------------------------------------------ GPT-2 vs tiktoken
GPT2_TEXTS = [
    "Hello, world! <|endoftext|>",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\n\n\n  mixed \t\n ",
    "It's a dog's life; we'll see, they've gone, I'm here, you'd know, they're THERE'S",
    "Unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "Emoji: 🙂👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️ and ZWJ sequences",
    "Numbers 3.14159 1,000,000 007 2024-11-23 ١٢٣",
    "code: def f(x):\n    return x**2  # comment\n\tif a!=b: pass",
    "\u0000\u0001 control \x7f chars \ufeff BOM \u200b zero width",
    "a" * 500 + " " + "ab" * 300,
    "<|endoftext" + "|> not quite special <|endof text|>",
]


def test_gpt2_check_values_from_data_readme(gpt2):
    verdict = data_file("the-verdict.txt").read_text(encoding="utf-8")
    ids = gpt2.encode(verdict)
    assert len(ids) == 5145 and ids[:4] == [40, 367, 2885, 1464]
    assert gpt2.encode("Hello, world! <|endoftext|>", allowed_special="all") == [15496, 11, 995, 0, 220, 50256]
    assert gpt2.vocab_size == 50257 and len(gpt2.merges) == 50000
    assert gpt2.eos_token_id == 50256


@pytest.mark.parametrize("fast", [True, False])
def test_gpt2_equals_tiktoken(gpt2, tiktoken_gpt2, fast):
    for text in GPT2_TEXTS:
        assert gpt2.encode(text, disallowed_special=(), fast=fast) == tiktoken_gpt2.encode(text, disallowed_special=())
        assert gpt2.decode(gpt2.encode(text, disallowed_special=(), fast=fast)) == text


def test_gpt2_equals_tiktoken_on_tinyshakespeare(gpt2, tiktoken_gpt2):
    text = data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert len(ids) == 338_025
    assert ids == tiktoken_gpt2.encode(text)
    part = text[:150_000]
    assert gpt2.encode(part, fast=False) == tiktoken_gpt2.encode(part)


@SETTINGS
@given(st.text(max_size=60))
def test_gpt2_equals_tiktoken_on_random_unicode(gpt2, tiktoken_gpt2, text):
    expect = tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.encode(text, disallowed_special=()) == expect
    assert gpt2.encode(text, disallowed_special=(), fast=False) == expect


@SETTINGS
@given(st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000abZ'sdtlmvre19é!.,-", max_size=40))
def test_gpt2_whitespace_and_contractions_stress(gpt2, tiktoken_gpt2, text):
    """Whitespace runs, contractions and punctuation: where the two spellings of GPT-2's regex could differ."""
    expect = tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.encode(text, fast=False) == expect
    assert gpt2.encode(text) == expect


def test_special_token_semantics_like_tiktoken(gpt2, tiktoken_gpt2):
    text = "a <|endoftext|> b"
    with pytest.raises(TokenizerError, match="disallowed"):
        gpt2.encode(text)
    with pytest.raises(ValueError):  # tiktoken raises too
        tiktoken_gpt2.encode(text)
    with pytest.raises(ValueError):  # TokenizerError is a ValueError, like tiktoken's
        gpt2.encode(text, fast=False)
    for kwargs in [dict(allowed_special="all"), dict(allowed_special={"<|endoftext|>"}),
                   dict(disallowed_special=()), dict(allowed_special=set(), disallowed_special=())]:
        expect = tiktoken_gpt2.encode(text, **kwargs)
        assert gpt2.encode(text, **kwargs) == expect
        assert gpt2.encode(text, **kwargs, fast=False) == expect
    assert 50256 in gpt2.encode(text, allowed_special="all")
    assert 50256 not in gpt2.encode(text, disallowed_special=())
    assert gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
    # a special is only disallowed when named: disallowed_special={} with nothing allowed -> plain text
    assert gpt2.encode_batch(["x<|endoftext|>", "y"], allowed_special="all") == [[87, 50256], [88]]
    assert gpt2.encode_batch(["x<|endoftext|>", "y"], disallowed_special=()) == tiktoken_gpt2.encode_batch(
        ["x<|endoftext|>", "y"], disallowed_special=())
    with pytest.raises(TokenizerError, match="disallowed"):
        gpt2.encode_batch(["fine", "not <|endoftext|> fine"])


def test_fast_and_pure_paths_agree_on_trained_tokenizer(small_tok):
    assert small_tok.has_fast_path
    texts = [Path(__file__).read_text(encoding="utf-8"), "naïve 🙂 <|pad|> x", "  \n\n\t end  "]
    for t in texts:
        assert small_tok.encode(t, disallowed_special=()) == small_tok.encode(t, disallowed_special=(), fast=False)
        assert small_tok.encode(t, allowed_special="all") == small_tok.encode(t, allowed_special="all", fast=False)


def test_fast_path_refused_when_ranks_are_not_tiktoken_expressible():
    # merges (b,c) then (a,b) then (ab,c): "abc" is a token, but merge-order BPE turns b"abc" into [a, bc];
    # tiktoken's "lowest-rank concatenation" rule would give [abc]. The fast path must not be used.
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"bc", 257: b"ab", 258: b"abc"})
    tok = Tokenizer(vocab, [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert not tok.has_fast_path
    a, bc = ord("a"), 256
    assert tok.encode("abc") == [a, bc] == tok.encode("abc", fast=True)


def test_fast_path_accepted_only_when_it_agrees_on_random_vocabularies():
    """Random merge lists over {a, b, c}: whenever the fast path is accepted, tiktoken's rule gives the same ids
    as merge-order BPE (and rejected vocabularies include ones where it would not)."""
    rng = random.Random(1234)
    accepted = rejected = 0
    for _ in range(300):
        toks = [b"a", b"b", b"c"]
        vocab = {i: bytes([i]) for i in range(256)}
        merges = []
        for _ in range(rng.randint(1, 12)):
            a, b = rng.choice(toks), rng.choice(toks)
            if a + b in toks or len(a + b) > 8:
                continue
            vocab[len(vocab)] = a + b
            merges.append((a, b))
            toks.append(a + b)
        tok = Tokenizer(vocab, merges, pattern=r"[abc]+|[^abc]+")
        if not tok.has_fast_path:
            rejected += 1
            continue
        accepted += 1
        for _ in range(10):
            text = "".join(rng.choice("abc") for _ in range(rng.randint(1, 14)))
            assert tok.encode(text) == tok.encode(text, fast=False), (merges, text)
    assert accepted > 100 and rejected > 30


# ------------------------------------------------------------------------------------------------ decode
@SETTINGS
@given(st.text(max_size=80))
def test_decode_is_lossless_for_any_text(small_tok, text):
    assert small_tok.decode(small_tok.encode(text, disallowed_special=())) == text
    assert small_tok.decode(small_tok.encode(text, disallowed_special=(), fast=False)) == text
    assert small_tok.decode_bytes(small_tok.encode(text, disallowed_special=())) == text.encode("utf-8")


def test_decode_split_utf8_uses_replacement_and_never_raises(gpt2):
    ids = gpt2.encode("🙂")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    assert gpt2.decode(ids[:1]) == "\ufffd" * len(gpt2.decode(ids[:1]))
    assert "\ufffd" in gpt2.decode(ids[:1])
    assert gpt2.decode_bytes(ids[:1]) + gpt2.decode_bytes(ids[1:]) == "🙂".encode()
    rng = random.Random(0)
    for _ in range(200):
        gpt2.decode([rng.randrange(gpt2.vocab_size) for _ in range(rng.randrange(1, 8))])
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        gpt2.decode([50257])


def test_bytes_to_unicode_is_gpt2_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[32] == "Ġ" and table[10] == "Ċ" and table[ord("A")] == "A"


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_training_input(tmp_path):
    with pytest.raises(DataError, match="empty corpus"):
        Tokenizer.train([""], 300, progress=False)
    with pytest.raises(DataError, match="empty corpus"):
        Tokenizer.train(["<|endoftext|>"], 300, progress=False)
    with pytest.raises(TokenizerError, match="vocab_size 256 is too small"):
        Tokenizer.train(["hello"], 256, progress=False)
    with pytest.raises(DataError, match="file not found"):
        Tokenizer.train([tmp_path / "missing.txt"], 300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        Tokenizer.train([bad], 300)
    with pytest.raises(DataError, match="is a directory"):
        Tokenizer.train([tmp_path], 300)
    with pytest.raises(TokenizerError, match="not a valid regex"):
        Tokenizer.train(["x"], 300, pattern="(unclosed")
    with pytest.raises(TokenizerError):
        Tokenizer.train(["x"], 300, special_tokens=[""])
    # all of these are LmforgeError, one line
    try:
        Tokenizer.train([bad], 300)
    except LmforgeError as e:
        assert "\n" not in str(e)


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": {', encoding="utf-8")
    with pytest.raises(TokenizerError, match="corrupt JSON"):
        Tokenizer.load(bad)
    bad.write_text('{"hello": 1}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a tokenizer.json"):
        Tokenizer.load(bad)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "empty-dir")
    with pytest.raises(DataError, match="file not found"):
        Tokenizer.load(tmp_path / "absent.json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t x\n", encoding="utf-8")
    (tmp_path / "encoder.json").write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(TokenizerError):
        Tokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    with pytest.raises(TokenizerError, match="expects a str"):
        Tokenizer.train(["abc"], 260, progress=False).encode(b"bytes")  # type: ignore[arg-type]
