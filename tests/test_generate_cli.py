"""`lmforge generate` / `lmforge chat` on a saved model directory: flags override generation_config.json, the
completion alone is printed, streaming prints the same text, chat works with piped (non-tty) stdin."""

from __future__ import annotations

import io
import json

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.models.config import ModelConfig
from lmforge.generation.config import GenerationConfig
from lmforge.lm import LM
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.bpe import Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens={"<|endoftext|>": 256},
                    eos_token="<|endoftext|>")
    cfg = ModelConfig.from_name("gpt-tiny", vocab_size=257, block_size=512, n_layer=2, n_embd=64, init_std=0.2)
    lm = LM(Transformer(cfg), tok, cfg, GenerationConfig(max_new_tokens=12, temperature=0.0))
    d = tmp_path_factory.mktemp("m") / "model"
    lm.save(d)
    return d


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_only_the_completion(model_dir, capsys):
    lm = lmforge.load(model_dir)
    want = lm.generate("Hello", ignore_eos=False)  # generation_config: greedy, 12 tokens
    code, out, _ = run(["generate", model_dir, "--prompt", "Hello"], capsys)
    assert code == 0 and out == str(want) + "\n"
    code, out2, _ = run(["generate", model_dir, "--prompt", "Hello", "--stream"], capsys)
    assert out2 == out


def test_flags_override_generation_config(model_dir, capsys):
    lm = lmforge.load(model_dir)
    want = lm.generate("Hi", max_new_tokens=5, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01,
                       repetition_penalty=1.2, seed=7)
    code, out, _ = run(["generate", model_dir, "-p", "Hi", "-n", "5", "--temperature", "0.9", "--top-k", "50",
                        "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.2", "--seed", "7"], capsys)
    assert code == 0 and out == str(want) + "\n"
    free = str(lm.generate("Hi", max_new_tokens=12))
    stop = free[3:5]
    code, out, _ = run(["generate", model_dir, "-p", "Hi", "--stop", stop], capsys)
    assert out == free[:free.find(stop)] + "\n"


def test_prompt_from_stdin_and_errors(model_dir, capsys, monkeypatch):
    lm = lmforge.load(model_dir)
    code, out, _ = run(["generate", model_dir], capsys, stdin="Piped", monkeypatch=monkeypatch)
    assert code == 0 and out == str(lm.generate("Piped")) + "\n"
    code, _, err = run(["generate", model_dir, "-p", "x", "--top-p", "1.5"], capsys)
    assert code == 1 and err.startswith("error: top_p must be in (0, 1]") and err.count("\n") == 1
    code, _, err = run(["generate", model_dir, "-p", "x" * 600], capsys)
    assert code == 1 and "context window is 512" in err
    code, out, _ = run(["generate", model_dir, "-p", "x" * 600, "--truncate", "-n", "1"], capsys)
    assert code == 0


def test_chat_with_piped_stdin_history_and_reset(model_dir, capsys, monkeypatch):
    lm = lmforge.load(model_dir)
    sys_msg = {"role": "system", "content": "Be brief."}
    first = lm.chat([sys_msg, {"role": "user", "content": "Hi"}])
    second = lm.chat([sys_msg, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": str(first)},
                      {"role": "user", "content": "More"}])
    again = lm.chat([sys_msg, {"role": "user", "content": "More"}])
    code, out, _ = run(["chat", model_dir, "--system", "Be brief."], capsys,
                       stdin="Hi\nMore\n/reset\nMore\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0
    assert out == f"{first}\n{second}\n(history cleared)\n{again}\n"


def test_generation_config_file_is_read(model_dir):
    data = json.loads((model_dir / "generation_config.json").read_text())
    assert data["max_new_tokens"] == 12 and data["temperature"] == 0.0


def test_chat_drops_oldest_turns_when_history_outgrows_the_context(model_dir, capsys, monkeypatch):
    from lmforge.cli.generate import _fit_history
    from lmforge.generation.api import chat_prompt, encode_chat

    lm = lmforge.load(model_dir)  # byte tokenizer: one token per character, 512-token context
    long = "y" * 150
    msgs = [{"role": "system", "content": "S"}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"{i}{long}"}, {"role": "assistant", "content": long}]
    msgs.append({"role": "user", "content": "last"})
    kept = _fit_history(lm, msgs, room=12)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and len(kept) < len(msgs)
    assert len(encode_chat(lm, chat_prompt(lm, kept))) + 12 <= 512
    assert kept == [msgs[0]] + msgs[len(msgs) - len(kept) + 1:]  # the newest turns, in order
    code, out, _ = run(["chat", model_dir, "--system", "S"], capsys,
                       stdin="".join(f"{i}{long}\n" for i in range(4)), monkeypatch=monkeypatch)
    assert code == 0 and out.count("\n") == 4
