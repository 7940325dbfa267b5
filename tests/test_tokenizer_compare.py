"""`lmforge tokenizer compare`: real tokenizers from ../shared/data cut the same text, checked against tiktoken and
Hugging Face `tokenizers` (ids and pieces), and the printed report checked against those counts."""

from __future__ import annotations

import pytest

tiktoken = pytest.importorskip("tiktoken")
hf_tokenizers = pytest.importorskip("tokenizers")
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.cli.tokenizer import resolve_tokenizer  # noqa: E402
from lmforge.tokenizers.bpe import _GPT2_PATTERN_FAST  # noqa: E402
from lmforge.tokenizers.compare import compare_tokenizers, format_comparison, show_piece  # noqa: E402
from lmforge.tokenizers.tiktoken_file import ENCODINGS, write_tiktoken_ranks  # noqa: E402

from helpers import shared_data_dir  # noqa: E402

TEXT = "Tokenization isn't free: 12345 apples, naïve café 日本語 🎉 <|endoftext|>"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = shared_data_dir()
    if not (d / "gpt2" / "vocab.bpe").exists() or not (d / "stories260K" / "tok512.bin").exists():
        pytest.skip("GPT-2 / stories260K tokenizer files not in ../shared/data")
    tmp = tmp_path_factory.mktemp("compare")
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "gpt2" / "vocab.bpe"), str(d / "gpt2" / "encoder.json"))
    tiktoken_file = write_tiktoken_ranks(ranks, tmp / "cl100k_base.tiktoken")
    gpt2 = resolve_tokenizer(str(d / "gpt2"))
    hf_dir = tmp / "hf"
    gpt2.save(hf_dir)  # a tokenizer.json that Hugging Face `tokenizers` reads
    return {"gpt2": str(d / "gpt2"), "llama2c": str(d / "stories260K" / "tok512.bin"), "tiktoken": str(tiktoken_file),
            "hf": str(hf_dir / "tokenizer.json"), "ranks": ranks}


def test_splits_equal_the_reference_tokenizers(data):
    specs = ["char", "word", data["gpt2"], data["tiktoken"], data["hf"], data["llama2c"]]
    rows = {r.name: r for r in compare_tokenizers(TEXT, {s: resolve_tokenizer(s) for s in specs})}

    gpt2 = tiktoken.Encoding("gpt2", pat_str=_GPT2_PATTERN_FAST, mergeable_ranks=data["ranks"],
                             special_tokens={"<|endoftext|>": 50256})
    want = gpt2.encode(TEXT, allowed_special="all")
    assert rows[data["gpt2"]].ids == want
    assert rows[data["gpt2"]].pieces == [gpt2.decode_single_token_bytes(i) for i in want]

    cl100k = tiktoken.Encoding("cl100k-on-gpt2-ranks", pat_str=ENCODINGS["cl100k_base"]["pattern"],
                               mergeable_ranks=data["ranks"], special_tokens=ENCODINGS["cl100k_base"]["special_tokens"])
    want = cl100k.encode(TEXT, allowed_special="all")
    assert rows[data["tiktoken"]].ids == want
    assert rows[data["tiktoken"]].pieces == [cl100k.decode_single_token_bytes(i) for i in want]
    assert rows[data["tiktoken"]].n_tokens != rows[data["gpt2"]].n_tokens  # same ranks, another split pattern

    hf = hf_tokenizers.Tokenizer.from_file(data["hf"])
    assert rows[data["hf"]].ids == hf.encode(TEXT, add_special_tokens=False).ids

    # byte-level pieces join back to the text's bytes; llama2.c's SentencePiece pieces add the dummy-prefix space
    for name in (data["gpt2"], data["tiktoken"], data["hf"]):
        assert b"".join(rows[name].pieces) == TEXT.encode("utf-8")
    assert b"".join(rows[data["llama2c"]].pieces) == b" " + TEXT.encode("utf-8")
    assert rows[data["llama2c"]].ids == resolve_tokenizer(data["llama2c"]).encode(TEXT)  # no special: plain text
    # the teaching tokenizers: one token per character; one per word, unseen ones as <|unk|>
    assert rows["char"].n_tokens == len(TEXT.replace("<|endoftext|>", "")) + 1
    assert b"<|unk|>" in rows["word"].pieces and rows["word"].n_tokens < rows["char"].n_tokens


def test_cli_report(data, capsys):
    assert main(["tokenizer", "compare", TEXT, "--tokenizers", f"char,{data['gpt2']}",
                 "--tokenizers", data["tiktoken"]]) == 0
    out = capsys.readouterr().out
    gpt2_ids = resolve_tokenizer(data["gpt2"]).encode(TEXT, allowed_special="all")
    assert "[Token][ization][ isn]['t][ free][:]" in out  # GPT-2's boundaries, shown as they are
    assert "[ \\xe6][\\x97]" in out  # a byte-level piece that is part of a UTF-8 character, as \xNN
    table = {line.split()[0]: line.split() for line in out.splitlines()[-3:]}
    assert table["gpt2"][2] == str(len(gpt2_ids))  # name, vocab, tokens, chars/token, tokens/word
    assert float(table["gpt2"][3]) == pytest.approx(len(TEXT) / len(gpt2_ids), abs=0.01)
    assert table["char"][2] == str(len(TEXT) - len("<|endoftext|>") + 1)
    assert "cl100k_base.tiktoken" in table


def test_bad_spec_is_a_one_line_error(capsys):
    assert main(["tokenizer", "compare", "hi", "--tokenizers", "char,no/such/dir/tok.json"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: tokenizer 'no/such/dir/tok.json'") and err.count("\n") == 1


def test_format_comparison_table():
    from lmforge.tokenizers.compare import Split

    rows = [Split("a", "X", 10, [1, 2], [b"ab", b"\xe6"]), Split("b", "Y", 20, [1], [b"ab\n"])]
    out = format_comparison("ab c", rows)
    assert "[ab][\\xe6]" in out and "[ab\\n]" in out and show_piece(b"\t") == "\\t"
    assert out.splitlines()[-2].split() == ["a", "10", "2", "2.00", "1.00"]
    assert out.splitlines()[-1].split() == ["b", "20", "1", "4.00", "0.50"]
