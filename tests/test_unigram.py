"""Unigram tokenization: ids equal the `tokenizers` library's and transformers' PreTrainedTokenizerFast's for a T5-style
tokenizer.json trained here (no T5 file is available offline), on fixed and hypothesis-generated strings."""

import json
import re

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


# ---- SentencePiece's Precompiled normalizer (T5, mT5, XLM-R files) ------------------------------------------------
NFKC_TEXTS = ["Ｈｅｌｌｏ，ｗｏｒｌｄ！ １２３ ＡＢＣ", "ﬁne ﬂow eﬀort oﬃce ﬆ", "① ⅻ ㎏ ㍻ ™ ½ x² ℌ ſ µ Ǆ … ‥ ℃ ㈱",
              "odd\u00a0spaces\u2003and\u3000more\u2009here\u202fx", "zero\u200bwidth\ufeffbom\u2028line\u2029par",
              "ctl\x01\x07\x7fchars", "e\u0301te\u0301 A\u030a Å", "ｶﾞｷﾞ ﾊﾟﾝ", "a\r\nb\tc\x0bd\x0ce", "Ａ\u0301 ﬁ\u0301 ｅ\u0308",
              "ﻼ ﷺ 각", "  many   spaces  ", "plain ASCII, nothing to do.", "", "\u00a0", "Ⅷ. ㋿ 🄰 ℡"]
_nfkc_chars = st.one_of(st.sampled_from(sorted(set("".join(NFKC_TEXTS)) | set("abc XYZ.,"))),
                        st.characters(blacklist_categories=("Cs", "Cn", "Co")))


def test_precompiled_charsmap_rules():
    from lmforge.tokenizers.unigram import PrecompiledCharsmap

    m = PrecompiledCharsmap.from_rules({"ﬁ": "fi", "e": "E", "e\u0301": "é", "\r": " ", "\r\n": "\n", "x": ""})
    assert m.normalize("ﬁx") == "fi"
    # SentencePiece: the longest key at each position; tokenizers: a short grapheme cluster is replaced whole by
    # the value of the shortest key it begins with ("e" + combining acute is one cluster; "\r\n" is one too)
    assert m.normalize_longest("e\u0301e\r\n") == "éE\n"
    assert m.normalize("e\u0301e\r\n") == "EE "
    with pytest.raises(TokenizerError, match="precompiled_charsmap"):
        PrecompiledCharsmap(b"\x08\x00\x00\x00\x00")


@pytest.fixture(scope="module")
def spm_t5(tmp_path_factory):
    """A SentencePiece Unigram model trained with nmt_nfkc, converted by transformers to a T5 tokenizer.json."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    path = shared_data_dir() / "the-verdict.txt"
    if not path.exists():
        pytest.skip("the-verdict.txt is not in the shared data folder")
    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(input=str(path), model_prefix=str(d / "spiece"), vocab_size=300,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc",
                                   character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    try:
        hf = transformers.T5Tokenizer.from_pretrained(str(d), extra_ids=3)  # transformers 5: converted from spm
    except Exception as e:  # noqa: BLE001 - an older transformers needs T5TokenizerFast for the conversion
        pytest.skip(f"this transformers cannot convert spiece.model here ({type(e).__name__})")
    if not hasattr(hf, "backend_tokenizer"):
        hf = transformers.T5TokenizerFast.from_pretrained(str(d), extra_ids=3, from_slow=True)
    out = d / "fast"
    hf.save_pretrained(str(out))
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert "Precompiled" in json.dumps(data["normalizer"])  # the table under test is in the file
    return spm.SentencePieceProcessor(model_file=str(d / "spiece.model")), hf, UnigramTokenizer.load(out), d


def test_precompiled_ids_equal_transformers(spm_t5):
    _, hf, ours, _ = spm_t5
    for s in NFKC_TEXTS:
        assert ours.encode(s) == hf(s)["input_ids"], repr(s)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=_nfkc_chars, max_size=24))
def test_hypothesis_precompiled_ids_equal_transformers(spm_t5, s):
    _, hf, ours, _ = spm_t5
    assert ours.encode(s) == hf(s)["input_ids"]


def _spm_whitespace(s: str) -> str:
    """SentencePiece's steps after the table: strip and collapse spaces, a dummy "▁" prefix, spaces as "▁"."""
    s = re.sub(" +", " ", s.strip(" "))
    return "▁" + s.replace(" ", "▁") if s else ""


def _charsmap(ours):
    return next(n for n in [ours.data["normalizer"], *ours.data["normalizer"].get("normalizers", [])]
                if n["type"] == "Precompiled")["precompiled_charsmap"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from(NFKC_TEXTS), st.text(alphabet=_nfkc_chars, max_size=24)))
def test_longest_match_equals_sentencepiece(spm_t5, s):
    from lmforge.tokenizers.unigram import PrecompiledCharsmap

    sp, _, ours, _ = spm_t5
    table = PrecompiledCharsmap.from_base64(_charsmap(ours))
    assert _spm_whitespace(table.normalize_longest(s)) == sp.normalize(s)


_T5_CONVERT = """
import json, sys
from transformers import T5Tokenizer, T5TokenizerFast
d, texts = sys.argv[1], json.loads(sys.argv[2])
slow = T5Tokenizer(d + "/spiece.model", extra_ids=3, legacy=True)
fast = T5TokenizerFast(vocab_file=d + "/spiece.model", extra_ids=3, legacy=True, from_slow=True)
fast.save_pretrained(d + "/fast4")
print(json.dumps([[fast(t).input_ids, slow(t).input_ids] for t in texts]))
"""


def test_transformers4_t5_file_equals_its_fast_tokenizer(spm_t5):
    """The T5 layout real checkpoints ship (transformers 4's T5Converter: Precompiled, Strip, Replace), when a
    transformers 4 install is named by LMFORGE_TRANSFORMERS4."""
    import os
    import subprocess
    import sys

    path = os.environ.get("LMFORGE_TRANSFORMERS4")
    if not path:
        pytest.skip("set LMFORGE_TRANSFORMERS4 to a transformers 4 install to compare with its T5 conversion")
    d = spm_t5[3]
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _T5_CONVERT, str(d), json.dumps(NFKC_TEXTS)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ours = UnigramTokenizer.load(d / "fast4")
    for s, (fast, _slow) in zip(NFKC_TEXTS, json.loads(res.stdout.strip().splitlines()[-1])):
        assert ours.encode(s) == fast, repr(s)


@pytest.mark.parametrize("individual", [True, False])
def test_digits_pre_tokenizer_matches_tokenizers(trained, individual):
    """The Digits pre-tokenizer after Metaspace (the seq2seq demo's tokenizer reads dates digit by digit)."""
    data = json.loads(json.dumps(trained[1].data))
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        data["pre_tokenizer"], {"type": "Digits", "individual_digits": individual}]}
    ref, ours = tokenizers.Tokenizer.from_str(json.dumps(data)), UnigramTokenizer.from_tokenizer_json(data)
    for s in FIXED + ["to iso: March 14, 2021", "03/14/2021 ½ Ⅷ ٣٤ x2y33z", "1999-01-02</s>7"]:
        assert ours.encode(s) == ref.encode(s).ids, s
        assert ours.decode(ref.encode(s).ids) == ref.decode(ref.encode(s).ids), s
