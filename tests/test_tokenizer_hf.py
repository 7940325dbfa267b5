"""Hugging Face tokenizer.json interop, checked against the `tokenizers` library itself (and transformers)."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HF

from conftest import data_file
from lmforge.errors import TokenizerError
from lmforge.tokenizers.bpe import GPT4_PATTERN, LLAMA3_PATTERN, HFTokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "  The quick brown fox\n\njumps over   the lazy dog.\t\r\n",
    "It's 2024; they'll pay $1,234.56 — naïve café, 日本語, 🙂👍🏽, e\u0301 vs é",
    "def f(x):\n    return x ** 2  # done\n",
    "",
    " ",
]
SPECIAL_TEXTS = ["a<|endoftext|>b", "<|endoftext|><|endoftext|>", "x <|pad|> y <|endoftext|>"]

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"


@pytest.fixture(scope="module")
def corpus() -> str:
    return data_file("the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(corpus) -> Tokenizer:
    return Tokenizer.train([corpus], 600, special_tokens=["<|endoftext|>", "<|pad|>"], progress=False,
                           pad_token="<|pad|>", chat_template=TEMPLATE)


def _hf_ids(hf: HF, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------------ save -> HF
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_saved_tokenizer_json_loads_in_tokenizers_with_identical_ids(corpus, tmp_path, pattern):
    tok = Tokenizer.train([corpus], 500, special_tokens=["<|endoftext|>", "<|pad|>"], pattern=pattern,
                          progress=False)
    path = tok.save(tmp_path / "tok.json")
    hf = HF.from_file(str(path))
    for text in TEXTS + [corpus[:3000]]:
        assert _hf_ids(hf, text) == tok.encode(text) == tok.encode(text, fast=False)
        assert hf.decode(tok.encode(text), skip_special_tokens=False) == text
    for text in SPECIAL_TEXTS:
        assert _hf_ids(hf, text) == tok.encode(text, allowed_special="all")
    assert hf.get_vocab_size() == tok.vocab_size


def test_save_load_round_trip_keeps_everything(trained, tmp_path):
    trained.add_bos_token = True
    try:
        out = trained.save(tmp_path / "model-dir")
    finally:
        trained.add_bos_token = False
    assert out == tmp_path / "model-dir" / "tokenizer.json"
    assert not list((tmp_path / "model-dir").glob("*.tmp"))  # atomic: no temp files left behind
    back = Tokenizer.load(tmp_path / "model-dir")
    assert isinstance(back, Tokenizer)
    assert back.merges == trained.merges and back.vocab == trained.vocab
    assert back.special_tokens == trained.special_tokens and back.pattern == trained.pattern
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (
        trained.bos_token_id, trained.eos_token_id, trained.special_tokens["<|pad|>"])
    assert back.add_bos_token is True and back.chat_template == TEMPLATE
    # the single file alone carries the extras too (model["lmforge"]), and HF adds BOS when asked to
    single = Tokenizer.load(tmp_path / "model-dir" / "tokenizer.json")
    assert single.pad_token == "<|pad|>" and single.chat_template == TEMPLATE and single.add_bos_token
    hf = HF.from_file(str(out))
    assert hf.encode("hi").ids == [trained.bos_token_id] + trained.encode("hi")


def test_transformers_autotokenizer_picks_up_specials_and_template(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    trained.save(tmp_path / "d")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "d"))
    assert auto.eos_token == "<|endoftext|>" and auto.pad_token == "<|pad|>"
    assert auto.pad_token_id == trained.pad_token_id and auto.eos_token_id == trained.eos_token_id
    text = "It was a lovely day, <|endoftext|> said Gisburn."
    assert auto(text, add_special_tokens=False)["input_ids"] == trained.encode(text, allowed_special="all")
    msgs = [{"role": "user", "content": "hi"}]
    assert auto.apply_chat_template(msgs, tokenize=False) == "<|user|>hi<|endoftext|>"


def test_save_refuses_a_file_as_directory(trained, tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    with pytest.raises(TokenizerError, match="not a directory"):
        trained.save(f)


# ------------------------------------------------------------------------------------------------ HF -> lmforge
def test_load_gpt2_tokenizer_json_built_by_tokenizers(tmp_path):
    enc, merges = data_file("gpt2/encoder.json"), data_file("gpt2/vocab.bpe")
    hf = HF(models.BPE.from_file(str(enc), str(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 50257 and tok.has_fast_path
    ref = Tokenizer.from_gpt2_files(enc, merges)
    assert tok.merges == ref.merges and tok.vocab == ref.vocab
    verdict = data_file("the-verdict.txt").read_text(encoding="utf-8")
    for text in TEXTS + SPECIAL_TEXTS[:2] + [verdict]:
        assert tok.encode(text, allowed_special="all") == _hf_ids(hf, text)
    # RoBERTa-style: an added token that eats the space before it is left to `tokenizers` (the wrapper)
    hf.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    hf.save(str(tmp_path / "roberta.json"))
    wrapped = Tokenizer.load(tmp_path / "roberta.json")
    assert isinstance(wrapped, HFTokenizer) and wrapped.vocab[hf.token_to_id("Ġthe")] == b" the"
    text = "The capital of France is <mask>."
    assert wrapped.encode(text, allowed_special="all") == _hf_ids(hf, text)
    assert wrapped.encode("plain text here") == tok.encode("plain text here")


def _llama3_style(corpus: str, nfc: bool = False) -> HF:
    """A Llama-3-shaped tokenizer.json (Split regex + ByteLevel, ignore_merges, BOS template), trained by HF."""
    hf = HF(models.BPE(ignore_merges=True))
    if nfc:  # Qwen 2 normalizes to NFC first
        hf.normalizer = normalizers.NFC()
    pattern = GPT4_PATTERN if nfc else LLAMA3_PATTERN
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([corpus], trainer)
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", hf.token_to_id("<|begin_of_text|>"))])])
    hf.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    return hf


@pytest.mark.parametrize("nfc", [False, True], ids=["llama3", "qwen2"])
def test_load_llama3_and_qwen_style_tokenizer_json(corpus, tmp_path, nfc):
    hf = _llama3_style(corpus, nfc)
    d = tmp_path / "hf"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True},
        "chat_template": TEMPLATE}), encoding="utf-8")
    tok = Tokenizer.load(d)
    assert isinstance(tok, Tokenizer)
    assert tok.ignore_merges and tok.add_bos_token and tok.normalizer == ("NFC" if nfc else None)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.chat_template == TEMPLATE and tok.added_tokens == {"<tool_call>": hf.token_to_id("<tool_call>")}
    texts = TEXTS + [corpus[:4000], "call <tool_call>{\"x\": 1}<|eot_id|>", "Ωmega e\u0301\u0301 ﬁ Å Å"]
    for text in texts:
        expect = _hf_ids(hf, text)
        assert tok.encode(text, allowed_special="all") == expect
        assert tok.encode(text, allowed_special="all", fast=False) == expect
        assert tok.decode(expect) == hf.decode(expect, skip_special_tokens=False)
    assert hf.encode("hi").ids[0] == tok.bos_token_id  # HF's post-processor adds BOS; lmforge records it
    # and it survives lmforge's own save
    tok.save(tmp_path / "again")
    hf2 = HF.from_file(str(tmp_path / "again" / "tokenizer.json"))
    for text in texts:
        assert _hf_ids(hf2, text) == _hf_ids(hf, text)
    assert Tokenizer.load(tmp_path / "again").eos_token == "<|eot_id|>"


# ------------------------------------------------------------------------------------------------ SentencePiece-style
def _llama2_style(corpus: str) -> HF:
    """A Llama-2/Mistral-shaped tokenizer.json: "▁" for spaces, byte fallback tokens <0x00>..<0xFF>, BOS template."""
    base = HF(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    base.train_from_iterator([corpus[:8000]], trainer)
    data = json.loads(base.to_str())
    trained_vocab = data["model"]["vocab"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for piece, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, s in enumerate(["<unk>", "<s>", "</s>"])]
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    return HF.from_str(json.dumps(data))


def test_sentencepiece_style_tokenizer_json_uses_the_wrapper(corpus, tmp_path):
    hf = _llama2_style(corpus)
    d = tmp_path / "llama2"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": TEMPLATE}))
    tok = Tokenizer.load(d)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    assert tok.add_bos_token and tok.chat_template == TEMPLATE and tok.vocab_size == hf.get_vocab_size()
    assert tok.vocab[3 + 10] == b"\n" and tok.vocab[1] == b"<s>"
    texts = TEXTS + ["Zürich 🙂 ∑ unseen chars ⊕", "a <s> b </s>"]
    for text in texts:
        expect = _hf_ids(hf, text) if "<s>" not in text else None
        ids = tok.encode(text, disallowed_special=())
        if expect is not None:
            assert ids == expect
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert tok.decode_bytes(ids).decode("utf-8", errors="replace") == tok.decode(ids)
    ids = tok.encode("🙂")
    assert all(3 <= i < 259 for i in ids[1:])  # unseen emoji -> 4 byte-fallback tokens
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # split character -> replacement, no exception
    # special-token semantics like tiktoken, on top of `tokenizers`
    with pytest.raises(TokenizerError, match="disallowed"):
        tok.encode("a </s>")
    assert tok.encode("a </s>", allowed_special="all") == _hf_ids(hf, "a </s>")
    assert 2 not in tok.encode("a </s>", disallowed_special=())
    mixed = tok.encode("x <s> y </s>", allowed_special={"</s>"}, disallowed_special=())
    assert mixed.count(2) == 1 and 1 not in mixed
    # saving writes a tokenizer.json that `tokenizers` reads back identically
    tok.save(tmp_path / "out")
    again = Tokenizer.load(tmp_path / "out")
    assert isinstance(again, HFTokenizer) and again.bos_token == "<s>" and again.chat_template == TEMPLATE
    assert again.encode(texts[2]) == tok.encode(texts[2])


def test_corrupt_bpe_model_is_a_clear_error(tmp_path, trained):
    data = trained.to_hf_dict()
    data["model"]["merges"] = data["model"]["merges"] + [["nonexistent", "token"]]
    (tmp_path / "bad.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        Tokenizer.load(tmp_path / "bad.json")
    data = trained.to_hf_dict()
    data["model"]["vocab"] = ["not", "a", "dict"]
    (tmp_path / "bad2.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(tmp_path / "bad2.json")


def test_metaspace_tokenizer_json_wrapper_decode_bytes_matches_decode(corpus, tmp_path):
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([corpus[:6000]], vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                           show_progress=False)
    sp.save(str(tmp_path / "sp.json"))
    hf = HF.from_file(str(tmp_path / "sp.json"))
    tok = Tokenizer.load(tmp_path / "sp.json")
    assert isinstance(tok, HFTokenizer) and tok.vocab[hf.token_to_id("▁the")] == b" the"
    for text in ["The picture was painted.", "  two  spaces", "Ｆｕｌｌｗｉｄｔｈ and ﬁ"]:
        ids = tok.encode(text)
        assert ids == _hf_ids(hf, text)
        assert tok.decode(ids) == hf.decode(ids)
        assert tok.decode_bytes(ids).decode() == tok.decode(ids)


def test_byte_level_file_without_all_256_bytes_goes_to_the_wrapper(corpus, tmp_path):
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=400, show_progress=False))  # no initial_alphabet
    hf.save(str(tmp_path / "partial.json"))
    tok = Tokenizer.load(tmp_path / "partial.json")
    assert isinstance(tok, HFTokenizer)
    for text in ["It was a lovely day.", "日本語 ünseen bytes 🙂"]:
        assert tok.encode(text) == _hf_ids(hf, text)
