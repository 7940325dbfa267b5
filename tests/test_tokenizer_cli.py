"""The teaching tokenizers (word, char) and `lmforge tokenizer train|encode|decode|info`."""

from __future__ import annotations

import json
import re

import pytest

from conftest import data_file
from lmforge.cli import main
from lmforge.errors import DataError, TokenizerError
from lmforge.tokenizers.bpe import Tokenizer
from lmforge.tokenizers.basic import UNK, CharTokenizer, WordTokenizer


# ------------------------------------------------------------------------------------------------ word / char
def test_word_tokenizer_as_in_the_course():
    text = data_file("the-verdict.txt").read_text(encoding="utf-8")
    tok = WordTokenizer.train([text])
    assert tok.vocab_size == 1132  # 1130 distinct words and marks + <|endoftext|> + <|unk|> (the course's count)
    assert tok.special_tokens == {"<|endoftext|>": 1130, UNK: 1131}
    sample = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    ids = tok.encode(sample)
    assert UNK.encode() not in b"".join(tok.vocab[i] for i in ids)
    assert tok.decode(ids) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    joined = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    ids = tok.encode(joined, allowed_special="all")
    assert ids.count(tok.unk_token_id) == 2  # "Hello" and "palace" are not in the story
    assert tok.special_tokens["<|endoftext|>"] in ids
    assert tok.decode(ids) == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    with pytest.raises(TokenizerError, match="disallowed"):
        tok.encode(joined)


def test_word_tokenizer_vocab_size_keeps_most_frequent():
    tok = WordTokenizer.train(["a a a b b c"], vocab_size=4)
    assert tok.vocab_size == 4 and tok.encode("a b c") == [0, 1, tok.unk_token_id]


def test_char_tokenizer_round_trip_and_unknowns(tmp_path):
    text = data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.train([text])
    assert tok.vocab_size == 65 + 2  # 65 distinct characters + <|endoftext|> + <|unk|>
    sample = text[:2000]
    assert tok.decode(tok.encode(sample)) == sample and len(tok.encode(sample)) == len(sample)
    assert tok.encode("é")[0] == tok.unk_token_id
    path = tok.save(tmp_path / "char")
    back = Tokenizer.load(tmp_path / "char")
    assert isinstance(back, CharTokenizer) and back.encode(sample) == tok.encode(sample)
    assert CharTokenizer.load(path).vocab == tok.vocab
    with pytest.raises(TokenizerError, match="not a CharTokenizer"):
        CharTokenizer.load(WordTokenizer.train(["x y"]).save(tmp_path / "w.json"))
    with pytest.raises(DataError, match="empty corpus"):
        CharTokenizer.train([""])
    with pytest.raises(TokenizerError, match="smaller than"):
        CharTokenizer.train(["abcdef"], vocab_size=3)
    (tmp_path / "bad.json").write_text(json.dumps({"type": "lmforge.char", "tokens": [1, 2]}))
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(tmp_path / "bad.json")


def test_basic_tokenizers_share_the_interface(tmp_path):
    for cls in (WordTokenizer, CharTokenizer):
        tok = cls.train(["the cat sat on the mat."])
        ids = tok.encode_batch(["the cat", "mat."])[0]
        assert isinstance(tok.decode_bytes(ids), bytes) and tok.vocab[ids[0]]
        assert tok.eos_token_id == tok.special_tokens["<|endoftext|>"] and tok.merges == []
        assert tok.add_bos_token is False and tok.chat_template is None
        with pytest.raises(TokenizerError):
            tok.decode([tok.vocab_size])


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_train_on_embedded_corpus_then_encode_decode_info(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path / "no-data-here"))  # must not need the shared data
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--vocab-size", "600", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "embedded corpus" in text and "vocab 600" in text and (out / "tokenizer.json").exists()
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 600

    assert main(["tokenizer", "encode", "-t", str(out), "The def statement"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode("The def statement")

    assert main(["tokenizer", "encode", "-t", str(out), "--show", "a <|endoftext|> b", "--allow-special"]) == 0
    shown = capsys.readouterr().out.splitlines()
    pieces = [tok.vocab[i].decode() for i in tok.encode("a <|endoftext|> b", allowed_special="all")]
    assert shown[0] == "".join(f"[{p}]" for p in pieces) and "[<|endoftext|>]" in shown[0]
    assert re.search(r"\d+ tokens, 17 bytes, [\d.]+ bytes/token", shown[2])

    assert main(["tokenizer", "decode", "-t", str(out), ",".join(map(str, ids))]) == 0
    assert capsys.readouterr().out == "The def statement\n"

    assert main(["tokenizer", "info", "-t", str(out), "--merges", "3"]) == 0
    info = capsys.readouterr().out
    assert "vocab size:      600" in info and "merge    2:" in info and "bytes/token" in info
    assert "<|endoftext|>=599" in info


def test_cli_train_files_word_kind_and_gpt4_pattern(tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("hello world, hello tokenizer. 12345 numbers\n" * 50, encoding="utf-8")
    assert main(["tokenizer", "train", str(f), "--vocab-size", "280", "--pattern", "gpt4",
                 "--special", "<s>", "--special", "</s>", "--out", str(tmp_path / "t.json")]) == 0
    tok = Tokenizer.load(tmp_path / "t.json")
    assert tok.special_tokens == {"<s>": 278, "</s>": 279} and tok.vocab_size == 280
    assert main(["tokenizer", "train", str(f), "--kind", "word", "--out", str(tmp_path / "w")]) == 0
    assert isinstance(Tokenizer.load(tmp_path / "w"), WordTokenizer)
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "{missing}", "--out", "{tmp}/x"], "file not found"),
    (["tokenizer", "train", "{latin1}", "--out", "{tmp}/x"], "not valid UTF-8"),
    (["tokenizer", "train", "{empty}", "--out", "{tmp}/x"], "empty corpus"),
    (["tokenizer", "train", "--vocab-size", "100", "--out", "{tmp}/x"], "vocab_size 100 is too small"),
    (["tokenizer", "encode", "-t", "{corrupt}", "hi"], "corrupt JSON"),
    (["tokenizer", "encode", "-t", "{good}", "a<|endoftext|>"], "disallowed"),
    (["tokenizer", "decode", "-t", "{good}", "1", "x2"], "not an integer"),
    (["tokenizer", "decode", "-t", "{good}", "99999"], "not in the vocabulary"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "latin1.txt").write_bytes("olé".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "corrupt.json").write_text("{not json")
    Tokenizer.train(["some text"], 260, progress=False).save(tmp_path / "good.json")
    paths = {"missing": tmp_path / "missing.txt", "latin1": tmp_path / "latin1.txt", "tmp": tmp_path,
             "empty": tmp_path / "empty.txt", "corrupt": tmp_path / "corrupt.json", "good": tmp_path / "good.json"}
    assert main([a.format(**paths) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_info_and_encode_on_a_llama2c_tokenizer(capsys):
    path = data_file("stories260K/tok512.bin")
    tok = Tokenizer.load(path)
    assert tok.vocab_size == 512
    assert main(["tokenizer", "info", "-t", str(path), "--merges", "0"]) == 0
    assert "vocab size:      512" in capsys.readouterr().out
    assert main(["tokenizer", "encode", "-t", str(path), "Once upon a time"]) == 0
    assert [int(x) for x in capsys.readouterr().out.split()] == tok.encode("Once upon a time")


def test_tokenizer_modules_do_not_import_torch():
    """Tokenizing is cheap: `import lmforge.tokenizers.bpe` must not pull in torch (seconds of start-up)."""
    import subprocess
    import sys

    code = "import sys, lmforge.tokenizers.bpe, lmforge.tokenizers.basic; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
