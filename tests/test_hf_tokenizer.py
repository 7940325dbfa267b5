"""Tokenizers travel with the model: a GPT-2 checkpoint's vocab.json/merges.txt give the GPT-2 tokenizer built from
OpenAI's shared encoder.json/vocab.bpe, and an export's tokenizer files load in `transformers.AutoTokenizer` with the
same ids (oracles: tiktoken built offline from the shared files, and transformers)."""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
from lmforge.formats.hf import export_hf  # noqa: E402
from lmforge.tokenizers.bpe import Tokenizer  # noqa: E402
from tests.conftest import data_file  # noqa: E402

TEXTS = ["Hello, world! <|endoftext|>", "  indented\n\tcode = x**2  # it's 3.14", "naïve café — 東京 🎉"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (full 50257 vocab) saved by transformers, with OpenAI's files as vocab.json/merges.txt."""
    d = tmp_path_factory.mktemp("gpt2tok") / "m"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(d)
    shutil.copy(data_file("gpt2/encoder.json"), d / "vocab.json")
    shutil.copy(data_file("gpt2/vocab.bpe"), d / "merges.txt")
    return d, model


def _tiktoken_gpt2():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(data_file("gpt2/vocab.bpe")), str(data_file("gpt2/encoder.json")))
    gpt2_regex = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # tiktoken's own
    return tiktoken.Encoding("gpt2-local", pat_str=gpt2_regex, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def test_gpt2_dir_gets_the_gpt2_tokenizer(gpt2_dir, tmp_path):
    d, ref = gpt2_dir
    lm = lmforge.load(d)
    enc = _tiktoken_gpt2()  # built from the shared encoder.json / vocab.bpe
    tok = lm.tokenizer
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 50257 and tok.eos_token_id == 50256
    assert {i: b for i, b in tok.vocab.items() if i != 50256} == {i: b for b, i in enc._mergeable_ranks.items()}
    assert len(tok.merges) == 50000
    verdict = data_file("the-verdict.txt").read_text(encoding="utf-8")
    ids = tok.encode(verdict)
    assert len(ids) == 5145 and ids[:4] == [40, 367, 2885, 1464] and ids == enc.encode(verdict)
    for t in TEXTS:
        assert tok.encode(t, allowed_special="all") == enc.encode(t, allowed_special="all")

    # export: transformers' AutoTokenizer reads our tokenizer files and agrees id for id
    export_hf(lm, tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for t in TEXTS + [verdict[:2000]]:
        assert auto(t)["input_ids"] == tok.encode(t, allowed_special="all")
    assert auto.eos_token == "<|endoftext|>"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([tok.encode("The verdict was")])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref(x).logits, atol=1e-5, rtol=0)

    # and the lmforge directory round trip keeps it
    lm.save(tmp_path / "lmf")
    again = lmforge.load(tmp_path / "lmf").tokenizer
    assert again.encode(verdict) == ids


def test_hf_tokenizer_json_is_used(gpt2_dir, tmp_path):
    """A directory whose tokenizer comes as tokenizer.json (what save_pretrained writes) loads it, even with
    vocab.json/merges.txt beside it (tokenizer.json also carries added tokens and the special-token setup)."""
    d, _ = gpt2_dir
    hf_tok = transformers.GPT2TokenizerFast(vocab=str(data_file("gpt2/encoder.json")),
                                            merges=str(data_file("gpt2/vocab.bpe")))
    d2 = tmp_path / "tj"
    shutil.copytree(d, d2)  # keeps OpenAI's vocab.json/merges.txt, which do not know <|pad|>
    hf_tok.add_special_tokens({"pad_token": "<|pad|>"})  # an added token vocab.json does not list
    hf_tok.save_pretrained(d2)
    lm = lmforge.load(d2)
    assert lm.tokenizer.eos_token_id == 50256 and lm.tokenizer.special_tokens["<|pad|>"] == 50257
    for t in TEXTS[1:]:
        assert lm.tokenizer.encode(t) == hf_tok(t)["input_ids"]
