""".tiktoken rank files (`lmforge.tokenizers.tiktoken_file`) against tiktoken itself.

No download: GPT-2's own files in ../shared/data/gpt2 are turned into ranks by tiktoken's
`data_gym_to_mergeable_bpe_ranks` and written in .tiktoken format. The oracle for each encoding name is the
`tiktoken.Encoding` that tiktoken's own constructor (`tiktoken_ext.openai_public`) builds, with its file loading
pointed at those ranks: the same split pattern and special tokens tiktoken uses for cl100k_base, o200k_base, r50k.
"""

from __future__ import annotations

import pytest

tiktoken = pytest.importorskip("tiktoken")
from hypothesis import given, settings, strategies as st  # noqa: E402
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402
from tiktoken_ext import openai_public  # noqa: E402

from lmforge.errors import NetworkError, TokenizerError  # noqa: E402
from lmforge.tokenizers import load_tokenizer  # noqa: E402
from lmforge.tokenizers.tiktoken_file import (ENCODINGS, FILES, download_tiktoken, load_tiktoken,  # noqa: E402
                                              read_tiktoken_ranks, recover_merges, write_tiktoken_ranks)

from helpers import shared_data_dir  # noqa: E402

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def tokenize(text):\n    return text.split()  # 42 tokens?\n\n\n",
    "I'm sure they'll say it's fine; YOU'RE WRONG, we've DON'T'd it.",
    "Numbers: 1234567890, 3.14159, 2024-11-05, $1,000,000 and 007.",
    "   leading spaces, trailing spaces   \n\t\ttabs\r\nwindows lines\n \n",
    "CamelCaseWords and snake_case_words and URLs: https://example.com/a/b?c=d",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, عربى",
    "Emoji 🎉👩‍👩‍👧 and combining e\u0301 and zero\u200bwidth",
    "<|endoftext|>special tokens <|fim_prefix|>inside<|fim_suffix|> text<|endofprompt|><|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def ranks():
    d = shared_data_dir() / "gpt2"
    if not (d / "vocab.bpe").exists():
        pytest.skip("GPT-2 tokenizer files not in ../shared/data/gpt2")
    return data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))


@pytest.fixture(scope="module")
def files(ranks, tmp_path_factory):
    """The GPT-2 ranks written once per encoding name (the name picks pattern and special tokens)."""
    d = tmp_path_factory.mktemp("tiktoken")
    out = {}
    for name in ("r50k_base", "cl100k_base", "o200k_base"):
        out[name] = write_tiktoken_ranks(ranks, d / name / f"{name}.tiktoken")
    return out


def tiktoken_encoding(name: str, ranks: dict[bytes, int], monkeypatch) -> "tiktoken.Encoding":
    """tiktoken's own Encoding for `name`, built by its constructor with the file loading replaced by `ranks`."""
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks)
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: ranks)
    spec = openai_public.ENCODING_CONSTRUCTORS[name]()
    spec.pop("explicit_n_vocab", None)  # GPT-2's 50256 ranks + <|endoftext|>: the count tiktoken asserts holds
    return tiktoken.Encoding(**spec)


def test_written_file_reads_back_as_tiktoken_reads_it(ranks, files):
    from tiktoken.load import load_tiktoken_bpe

    path = files["cl100k_base"]
    assert read_tiktoken_ranks(path) == ranks == load_tiktoken_bpe(str(path))


@pytest.mark.parametrize("name", list(openai_public.ENCODING_CONSTRUCTORS))
def test_encoding_table_matches_tiktoken(name, monkeypatch):
    """Our copy of each encoding's special tokens and pattern equals tiktoken's (the pattern by the pieces it cuts:
    GPT-2's is spelled differently in lmforge, with the same splits)."""
    import regex

    if name not in ENCODINGS:
        pytest.skip(f"tiktoken knows an encoding lmforge's table lacks: {name}")
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {})
    spec = openai_public.ENCODING_CONSTRUCTORS[name]()
    ours = ENCODINGS[name]
    assert ours["special_tokens"] == spec["special_tokens"]
    theirs_re, ours_re = regex.compile(spec["pat_str"]), regex.compile(ours["pattern"])
    for text in TEXTS:
        assert ours_re.findall(text) == theirs_re.findall(text)
    if name not in ("gpt2", "r50k_base", "p50k_base", "p50k_edit"):
        assert ours["pattern"] == spec["pat_str"]


@pytest.mark.parametrize("name", ["r50k_base", "cl100k_base", "o200k_base"])
def test_ids_equal_tiktoken(name, ranks, files, monkeypatch):
    enc = tiktoken_encoding(name, ranks, monkeypatch)
    tok = load_tiktoken(files[name])
    assert tok.special_tokens == enc._special_tokens
    for text in TEXTS:
        want = enc.encode(text, allowed_special="all")
        assert tok.encode(text, allowed_special="all") == want
        assert tok.encode(text, allowed_special="all", fast=False) == want  # the readable merge-order path too
        assert tok.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())
        assert tok.decode(want) == enc.decode(want)
    with pytest.raises(TokenizerError, match="disallowed"):
        tok.encode("a <|endoftext|> b")
    with pytest.raises(ValueError):  # tiktoken refuses it too
        enc.encode("a <|endoftext|> b")


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Z", "Cc", "M")),
                    max_size=60))
def test_random_text_equals_tiktoken_on_o200k_and_cl100k(text, ranks_and_tokenizers):
    for tok, enc in ranks_and_tokenizers:
        assert tok.encode(text, disallowed_special=(), fast=False) == enc.encode(text, disallowed_special=())


@pytest.fixture(scope="module")
def ranks_and_tokenizers(ranks, files):
    mp = pytest.MonkeyPatch()
    try:
        return [(load_tiktoken(files[n]), tiktoken_encoding(n, ranks, mp)) for n in ("cl100k_base", "o200k_base")]
    finally:
        mp.undo()


def test_custom_pattern_and_special_tokens(ranks, files, tmp_path):
    mine = write_tiktoken_ranks(ranks, tmp_path / "mine.tiktoken")
    with pytest.raises(TokenizerError, match="unknown encoding 'mine'.*pattern="):
        load_tiktoken(mine)
    specials = {"<|endoftext|>": 60000, "<|user|>": 60001}
    tok = load_tiktoken(mine, pattern=r"\s?\p{L}+|\s?\p{N}|\s?[^\s\p{L}\p{N}]+|\s+", special_tokens=specials)
    enc = tiktoken.Encoding("mine", pat_str=r"\s?\p{L}+|\s?\p{N}|\s?[^\s\p{L}\p{N}]+|\s+", mergeable_ranks=ranks,
                            special_tokens=specials)
    for text in TEXTS + ["<|user|>hi 2024<|endoftext|>"]:
        assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert tok.eos_token_id == 60000
    # a named pattern, and name= for a file whose name is not an encoding's
    gpt4 = load_tiktoken(mine, name="cl100k_base")
    assert gpt4.encode("don't 12345") == load_tiktoken(files["cl100k_base"]).encode("don't 12345")
    with pytest.raises(TokenizerError, match="already the rank"):
        load_tiktoken(mine, pattern="gpt2", special_tokens={"<|x|>": 5})


def test_directory_and_model_loading(ranks, files, tmp_path, monkeypatch):
    """`load_tokenizer(dir)` and `lmforge.load(model dir)` find a .tiktoken file when there is no tokenizer.json."""
    import shutil

    import lmforge
    from lmforge.lm import LM
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer
    import torch

    tok = load_tokenizer(files["cl100k_base"].parent)
    assert tok.encode("hello world") == load_tiktoken(files["cl100k_base"]).encode("hello world")
    model_dir = tmp_path / "model"
    cfg = ModelConfig.from_name("gpt-tiny", vocab_size=100277, n_layer=1, n_embd=32, n_head=2, block_size=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # the file's ids have holes (50257..100256 here): a random model must not pick one
        known = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        known[list(load_tiktoken(files["cl100k_base"]).vocab)] = True
        model.lm_head.weight[~known] = 0.0  # logit 0, below the largest of 50k random logits
    LM(model, None).save(model_dir)
    shutil.copy(files["cl100k_base"], model_dir)
    lm = lmforge.load(str(model_dir))
    enc = tiktoken_encoding("cl100k_base", ranks, monkeypatch)
    text = "hello <|endofprompt|> world"
    assert lm.tokenizer.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert lm.tokenizer.eos_token_id == enc.eot_token
    assert isinstance(lm.generate("hello", max_new_tokens=3, temperature=0.0), str)


def test_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"cl100k_base.tiktoken:2: expected"):
        load_tiktoken(bad)
    short = write_tiktoken_ranks({b"a": 0, b"b": 1}, tmp_path / "r50k_base.tiktoken")
    with pytest.raises(TokenizerError, match="all 256 single bytes"):
        load_tiktoken(short)
    with pytest.raises(TokenizerError, match="not the join of two"):
        recover_merges({**{bytes([i]): i for i in range(256)}, b"abc": 256})


def test_download_urls_and_hashes_match_tiktoken(monkeypatch):
    """FILES pins the same files and SHA-256 as tiktoken's own constructors."""
    from lmforge.tokenizers.tiktoken_file import BASE_URL

    for name, (file, sha) in FILES.items():
        seen = {}
        monkeypatch.setattr(openai_public, "load_tiktoken_bpe",
                            lambda url, expected_hash=None: seen.update(url=url, sha=expected_hash) or {})
        openai_public.ENCODING_CONSTRUCTORS[name]()
        assert seen == {"url": f"{BASE_URL}/{file}.tiktoken", "sha": sha}


@pytest.fixture
def server(files):
    """A local HTTP server on 127.0.0.1 serving the folder that holds cl100k_base.tiktoken (GPT-2's ranks)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files["cl100k_base"].parent))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_by_name_from_a_local_server(files, server, tmp_path, monkeypatch):
    import hashlib

    sha = hashlib.sha256(files["cl100k_base"].read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(NetworkError, match="SHA-256"):  # the pinned hash of OpenAI's file: ours differs
        download_tiktoken("cl100k_base", base_url=server, cache=cache)
    assert not cache.exists() or not any(cache.iterdir())  # nothing cached
    path = download_tiktoken("cl100k_base", base_url=server, sha256=sha, cache=cache)
    assert path.read_bytes() == files["cl100k_base"].read_bytes()
    # cached: a second call needs no server (a dead URL) and returns the same file
    assert download_tiktoken("cl100k_base", base_url="http://127.0.0.1:9", sha256=sha, cache=cache) == path
    # load_tiktoken("cl100k_base") goes through the download, with the cache directory from the environment
    monkeypatch.setenv("LMFORGE_TIKTOKEN_CACHE", str(cache))
    monkeypatch.setitem(FILES, "cl100k_base", ("cl100k_base", sha))
    monkeypatch.chdir(tmp_path)  # no local file of that name
    assert load_tiktoken("cl100k_base").encode("hello world") == load_tiktoken(files["cl100k_base"]).encode(
        "hello world")
    # a file:// base URL works too; an unreachable server is a one-line NetworkError
    other = download_tiktoken("cl100k_base", base_url=files["cl100k_base"].parent.as_uri(), sha256=sha,
                              cache=tmp_path / "cache2")
    assert other.read_bytes() == path.read_bytes()
    with pytest.raises(NetworkError, match="cannot download http://127.0.0.1:9/cl100k_base.tiktoken"):
        download_tiktoken("cl100k_base", base_url="http://127.0.0.1:9", sha256=sha, cache=tmp_path / "c3")
