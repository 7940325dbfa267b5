"""llama2.c interop: the stories260K model and its 512-token tokenizer reproduce llama2.c's own greedy output.

The oracle is the check text in the shared data README, printed by `run stories260K.bin -z tok512.bin -t 0 -n 200
-i "Once upon a time"`. A wrong RoPE permutation, tokenizer merge rule, or norm eps changes that text.
"""

from __future__ import annotations

import struct
import textwrap

import pytest
import torch

import lmforge
from lmforge.errors import CheckpointError, TokenizerError
from lmforge.formats.llama2c import hf_to_meta_rope, meta_to_hf_rope
from lmforge.tokenizers.llama2c import Llama2cTokenizer
from tests.conftest import data_file


def _check_text() -> str:
    readme = data_file("README.md").read_text(encoding="utf-8")
    block = readme.split("stories260K check value")[1].split("```")[1]
    return textwrap.dedent(block).strip("\n")


@pytest.fixture(scope="module")
def stories():
    return lmforge.load(data_file("stories260K/stories260K.bin"))


def test_stories260k_greedy_matches_llama2c(stories):
    lm = stories
    assert lm.config.n_layer == 5 and lm.config.n_kv_head == 4 and lm.config.vocab_size == 512
    assert lm.model.num_params() == 264_128 - 2 * 512 * 4  # the file's count includes the unused freq_cis tables
    tok = lm.tokenizer
    ids = [tok.bos_token_id] + tok.encode("Once upon a time")
    # llama2.c's loop: 200 forward steps from position 0; each step's token is printed after the BOS
    cache = lm.model.new_cache(1, 256)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]), kv_cache=cache)[0, -1]
        while len(ids) < 201:
            nxt = int(logits.argmax())
            if nxt == tok.bos_token_id:
                break
            ids.append(nxt)
            logits = lm.model(torch.tensor([[nxt]]), kv_cache=cache)[0, -1]
        full = lm.model(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-5)  # the cached decode equals a full forward pass
    assert tok.decode(ids) == _check_text()


def test_tokenizer_algorithm(stories):
    tok = stories.tokenizer
    assert tok.vocab_size == 512 and tok.add_bos_token and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    ids = tok.encode("Once upon a time")
    assert [tok.pieces[i] for i in ids] == [b" Once", b" upon", b" a", b" time"]
    assert tok.encode("") == []
    # a character outside the vocabulary falls back to its UTF-8 bytes (id = byte + 3) and round-trips
    s = "snow \u2603 ok"
    ids = tok.encode(s)
    assert [0xE2 + 3, 0x98 + 3, 0x83 + 3] == [i for i in ids if 3 <= i < 259][:3]
    assert tok.decode(ids) == s
    assert tok.vocab[3 + 0x0A] == b"\n"
    with pytest.raises(TokenizerError):
        tok.encode("a </s> b")
    assert tok.encode("a</s>", allowed_special="all")[-1] == 2
    # merging follows the highest score at each step: check against a brute-force re-implementation
    text = "The little dog's ball was very big and red."
    ids = [tok.token_to_id(" ")] + [tok.token_to_id(c) for c in text]
    while True:
        cands = [(tok.scores[j], -k, k, j) for k in range(len(ids) - 1)
                 if (j := tok.token_to_id(tok.pieces[ids[k]] + tok.pieces[ids[k + 1]])) is not None]
        if not cands:
            break
        _, _, k, j = max(cands)
        ids[k:k + 2] = [j]
    assert tok.encode(text) == ids


def test_tokenizer_save_roundtrip(stories, tmp_path):
    tok = stories.tokenizer
    p = tok.save(tmp_path / "tok.bin")
    assert p.read_bytes() == data_file("stories260K/tok512.bin").read_bytes()
    assert Llama2cTokenizer.load(p).encode("Hello there") == tok.encode("Hello there")


def test_rope_permutation_is_an_inverse_pair():
    w = torch.randn(4 * 8, 16)
    torch.testing.assert_close(hf_to_meta_rope(meta_to_hf_rope(w, 4), 4), w)
    # row 2i of a head goes to i, row 2i+1 to i + hd/2
    p = meta_to_hf_rope(torch.arange(8.0)[:, None].expand(8, 2), 1)[:, 0]
    assert p.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_llama2c_save_and_reload_lmforge_dir(stories, tmp_path):
    stories.save(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.bin").read_bytes() == data_file("stories260K/tok512.bin").read_bytes()
    lm = lmforge.load(tmp_path / "m")
    assert isinstance(lm.tokenizer, Llama2cTokenizer) and lm.generation_config.eos_token_id == 2
    x = torch.randint(0, 512, (1, 12))
    torch.testing.assert_close(lm.model(x), stories.model(x), atol=0, rtol=0)


def test_bad_llama2c_files(tmp_path):
    src = data_file("stories260K/stories260K.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(src[:-100])
    with pytest.raises(CheckpointError) as e:
        lmforge.load(tmp_path / "cut.bin")
    assert "truncated" in str(e.value) and "cut.bin" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "junk.bin").write_bytes(struct.pack("<7i", 64, -1, 5, 8, 4, 512, 512) + b"\0" * 64)
    with pytest.raises(CheckpointError) as e:
        lmforge.load(tmp_path / "junk.bin")
    assert "not a llama2.c model" in str(e.value)
    (tmp_path / "tok.bin").write_bytes(data_file("stories260K/tok512.bin").read_bytes()[:3000])
    with pytest.raises(TokenizerError):
        Llama2cTokenizer.load(tmp_path / "tok.bin")


def test_export_to_hf_reproduces_llama2c(stories, tmp_path):
    """lmforge export of stories260K: transformers' own Llama + AutoTokenizer give llama2.c's check text."""
    transformers = pytest.importorskip("transformers")
    from lmforge.formats.hf import export_hf

    export_hf(stories, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = stories.tokenizer
    lines = [ln for ln in data_file("tinyshakespeare/input.txt").read_text().split("\n") if ln][:200]
    for text in lines + ["snow \u2603 and caf\u00e9 \u6771\u4eac", "  two  spaces\tand tab\n", "Lily's"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    assert tok("Once upon a time")["input_ids"] == [1] + ours.encode("Once upon a time")  # BOS added by HF
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=201 - ids.shape[1], do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True) == _check_text()
    # and lmforge reads that HF directory back: SentencePiece-style tokenizer.json through `tokenizers`
    back = lmforge.load(tmp_path / "hf")
    assert back.tokenizer.add_bos_token and back.tokenizer.bos_token_id == 1
    for text in lines[:50]:
        assert back.tokenizer.encode(text) == ours.encode(text)
    x = torch.tensor([[1] + ours.encode("Once upon a time")])
    torch.testing.assert_close(back.model(x), stories.model(x), atol=0, rtol=0)
