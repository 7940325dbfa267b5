"""Unigram tokenization: ids equal the `tokenizers` library's and transformers' PreTrainedTokenizerFast's for a T5-style
tokenizer.json trained here (no T5 file is available offline), on fixed and hypothesis-generated strings."""

import json

import pytest

from lmforge.errors import TokenizerError
from lmforge.tokenizers.unigram import UnigramTokenizer, metaspace_split, viterbi
from tests.helpers import shared_data_dir

tokenizers = pytest.importorskip("tokenizers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

SENTINELS = [f"<extra_id_{i}>" for i in range(3)]
FIXED = ["Hello world", "  leading and trailing  ", "I had always thought Jack Gisburn rather a cheap genius",
         "tab\tnew\nline", "Ünïcödé ﬁ ligature ① ＦＵＬＬ", "emoji 🙂 and 中文 text", "a</s>b", "x <extra_id_0> y",
         "<extra_id_1>", "", " ", "the  the   the", "Mrs. Gisburn's \"drawing-room\"", "zzzqqq xylophone"]


def _train(byte_fallback: bool = False):
    """A T5-shaped tokenizer.json: Unigram trained on the-verdict.txt, T5's specials, sentinels, `$A </s>`."""
    from tokenizers import SentencePieceUnigramTokenizer, processors

    path = shared_data_dir() / "the-verdict.txt"
    if not path.exists():
        pytest.skip("the-verdict.txt is not in the shared data folder")
    tok = SentencePieceUnigramTokenizer()
    tok.train([str(path)], vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
              show_progress=False)
    tok.add_special_tokens(SENTINELS[::-1])  # T5 keeps <extra_id_0> last
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    data = json.loads(tok.to_str())
    if byte_fallback:  # add the 256 byte pieces and switch byte_fallback on, as Llama-style files do
        n = len(data["model"]["vocab"])
        data["model"]["vocab"] += [[f"<0x{b:02X}>", 0.0] for b in range(256)]
        for t in data["added_tokens"]:  # the sentinels move behind the byte pieces
            t["id"] += 256 if t["id"] >= n else 0
        data["model"]["byte_fallback"] = True
    return tokenizers.Tokenizer.from_str(json.dumps(data)), data


@pytest.fixture(scope="module")
def trained():
    ref, data = _train()
    return ref, UnigramTokenizer.from_tokenizer_json(data)


@pytest.fixture(scope="module")
def hf_fast(trained, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("unigram")
    trained[1].save(d)
    return transformers.AutoTokenizer.from_pretrained(str(d))


def test_worked_examples():
    assert metaspace_split("Hello  world") == ["▁Hello", "▁", "▁world"]
    assert metaspace_split("▁x", prepend="always") == ["▁x"]
    assert metaspace_split("x", prepend="first", first=False) == ["x"]
    pieces = {"a": (0, -1.0), "b": (1, -1.0), "ab": (2, -1.5), "c": (3, -1.0)}
    assert viterbi("abc", pieces, 2, -11.0) == [("ab", True), ("c", True)]
    assert viterbi("axyb", pieces, 2, -11.0) == [("a", True), ("xy", False), ("b", True)]  # unknowns fuse


def test_fixed_strings_match_tokenizers_and_transformers(trained, hf_fast):
    ref, ours = trained
    for s in FIXED:
        assert ours.encode(s) == ref.encode(s).ids, s
        assert ours.encode(s, add_special_tokens=False) == ref.encode(s, add_special_tokens=False).ids, s
        assert ours.encode(s) == hf_fast(s)["input_ids"], s
        ids = ref.encode(s).ids
        assert ours.decode(ids) == ref.decode(ids), s
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), s
    assert ours.eos_token_id == 1 and ours.pad_token_id == 0 and ours.unk_token_id == 2
    assert ours.token_to_id("<extra_id_0>") == ours.vocab_size - 1


_chars = st.one_of(st.sampled_from(list("abcdefghijklmnopqrstuvwxyz ABCJGM.,;'\"-!?\t\n  ")),
                   st.characters(blacklist_categories=("Cs", "Cn", "Co")))
# words, spaces, odd Unicode, and special tokens written into the text
text_strategy = st.lists(st.one_of(st.text(alphabet=_chars, max_size=12),
                                   st.sampled_from(SENTINELS + ["</s>", "<pad>", " ", "  "])),
                         max_size=6).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text_strategy)
def test_hypothesis_ids_equal_tokenizers(trained, s):
    ref, ours = trained
    assert ours.encode(s) == ref.encode(s).ids
    ids = ref.encode(s).ids
    assert ours.decode(ids) == ref.decode(ids)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text_strategy)
def test_hypothesis_ids_equal_transformers(trained, hf_fast, s):
    assert trained[1].encode(s) == hf_fast(s)["input_ids"]


def test_byte_fallback_matches_tokenizers():
    ref, data = _train(byte_fallback=True)
    ours = UnigramTokenizer.from_tokenizer_json(data)
    for s in FIXED + ["日本語のテキスト", "ŋ þ ð ǂ"]:
        assert ours.encode(s) == ref.encode(s).ids, s
        assert ours.decode(ref.encode(s).ids) == ref.decode(ref.encode(s).ids), s
    assert 2 not in ours.encode("日本語")  # unknown characters become bytes, not <unk>


def test_save_load_round_trip(trained, tmp_path):
    ours = trained[1]
    ours.save(tmp_path)
    again = UnigramTokenizer.load(tmp_path)
    assert all(again.encode(s) == ours.encode(s) for s in FIXED)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not Unigram"):
        UnigramTokenizer.from_tokenizer_json({"model": {"type": "BPE"}})
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        UnigramTokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="normalizer 'Bogus'"):
        UnigramTokenizer.from_tokenizer_json({"model": {"type": "Unigram", "vocab": [["a", 0.0]]},
                                              "normalizer": {"type": "Bogus"}})
