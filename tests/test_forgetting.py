"""Forgetting checks and replay in the SFT recipe (`--forgetting-data`, `--replay-data`, `--replay-ratio`).

References: the pretraining token stream is the one `lmforge.training.data.tokenize_to_shards` writes (what
`lmforge pretrain` trains on), the perplexity is recomputed by hand from the model's logits, and the "after"
figure is recomputed from the model directory the recipe saved.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.errors import ConfigError, DataError
from lmforge.finetune import data as D
from lmforge.lm import LM
from lmforge.models.config import ModelConfig
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.bpe import Tokenizer
from lmforge.training.data import TokenShards, read_documents, tokenize_to_shards

T = 128  # the tiny model's context
WORDS = "win prize call now free cash claim hello how are you see you at lunch today mom home late ok".split()


def test_replay_mix_spreads_replay_batches_evenly_and_keeps_main_order():
    replay = lambda k: ("replay", k)  # noqa: E731

    class Main:
        def __len__(self):
            return 12

        def __call__(self, i):
            return ("main", i)

    for ratio in (0.1, 0.25, 0.5, 1 / 3):
        mix = D.ReplayMix(Main(), replay, ratio)
        got = [mix(i) for i in range(60)]
        # reference: walk the batches, owing one replay batch each time the running share falls below `ratio`
        want, n_main, n_replay = [], 0, 0
        for i in range(60):
            if n_replay + 1 <= (i + 1) * ratio + 1e-9:
                want.append(("replay", n_replay))
                n_replay += 1
            else:
                want.append(("main", n_main))
                n_main += 1
        assert got == want, ratio
        assert len(mix) == math.ceil(12 / (1 - ratio))
    assert [i for i in range(12) if D.ReplayMix(Main(), replay, 0.25).is_replay(i)] == [3, 7, 11]
    with pytest.raises(DataError, match="replay ratio"):
        D.ReplayMix(Main(), replay, 1.0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([" ".join(WORDS * 30)], vocab_size=300, progress=False)


def test_text_tokens_is_the_pretraining_stream(tok, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("hello how are you\n\nsee you at lunch <|endoftext|> today\n" * 5)
    b.write_text("".join(json.dumps({"text": f"{w} {w} mom"}) + "\n" for w in WORDS))
    for i, sources in enumerate((str(a), f"{a},{b}")):
        got = D.text_tokens(tok, sources)
        tokenize_to_shards(read_documents(sources.split(",")), tok, tmp_path / f"shards{i}", progress=False)
        assert np.array_equal(got, TokenShards(tmp_path / f"shards{i}").numpy().astype(np.int64))
    with pytest.raises(DataError, match="file not found"):
        D.text_tokens(tok, str(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    from lmforge.finetune.data import ALPACA_PREAMBLE

    d = tmp_path_factory.mktemp("forget")
    t = Tokenizer.train([" ".join(WORDS * 30) + (ALPACA_PREAMBLE + "\n\n### Instruction:\n### Input:\n"
                                                  "### Response:\n") * 10], vocab_size=320, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=t.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                                intermediate_size=64, block_size=T, init_std=0.1)
    LM(Transformer(cfg), t, cfg).save(d / "base")
    rng = random.Random(0)
    recs = [{"instruction": f"say {a}", "input": "", "output": f"{a} {b}"} for a, b in
            (rng.sample(WORDS, 2) for _ in range(24))]
    (d / "instr.json").write_text(json.dumps(recs))
    (d / "corpus.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(8000)))
    return d


def _hand_perplexity(model, tokens, T):
    """exp(mean next-token cross-entropy) over non-overlapping windows of T inputs, computed from the logits."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, T):
            w = torch.as_tensor(tokens[s:s + T + 1], dtype=torch.long)[None]
            logits = model.eval()(w[:, :-1])
            nll += float(F.cross_entropy(logits[0].float(), w[0, 1:], reduction="sum"))
            n += w.shape[1] - 1
    return math.exp(nll / n), n


def _cfg(setup, out, **kw):
    from lmforge.recipes.sft import SFTConfig

    return SFTConfig(model=str(setup / "base"), data=str(setup / "instr.json"), out=str(out), max_steps=12,
                     lr=1e-2, batch_size=4, progress=False, eval_every=0, eval_generate=0, device="cpu",
                     forgetting_data=str(setup / "corpus.txt"), forgetting_tokens=500, **kw)


def test_sft_reports_forgetting_before_and_after(setup, tmp_path):
    from lmforge.recipes.sft import run_sft

    out = tmp_path / "full"
    lines = []
    m = run_sft(_cfg(setup, out), log=lines.append)
    base = lmforge.load(setup / "base")
    tokens = D.text_tokens(base.tokenizer, str(setup / "corpus.txt"))
    held = tokens[int(round(len(tokens) * 0.9)):][:500]  # the last 10%: what pretrain's val_fraction holds out
    ppl, n = _hand_perplexity(base.model, held, T)
    assert m["forgetting_tokens"] == n == 499
    assert m["forgetting_ppl_before"] == pytest.approx(ppl, rel=1e-5)
    after, _ = _hand_perplexity(lmforge.load(out).model, held, T)  # the saved fine-tuned model
    assert m["forgetting_ppl_after"] == pytest.approx(after, rel=1e-5)
    assert m["forgetting_ppl_after"] != pytest.approx(m["forgetting_ppl_before"], rel=1e-3)
    assert any(s.startswith("forgetting: perplexity on 499 held-out tokens") for s in lines)
    assert json.loads((out / "metrics.json").read_text())["forgetting_ppl_after"] == m["forgetting_ppl_after"]


def test_replay_mixes_pretraining_batches_into_sft(setup, tmp_path, monkeypatch):
    import lmforge.recipes.sft as sft

    seen = []
    real_train = sft.train

    def spy(model, source, config, **kw):  # record what the loop is fed
        seen.append([source(i) for i in range(config.max_steps)])
        return real_train(model, source, config, **kw)

    monkeypatch.setattr(sft, "train", spy)
    m = sft.run_sft(_cfg(setup, tmp_path / "replay", replay_data=str(setup / "corpus.txt"), replay_ratio=0.25,
                         adapter="bottleneck", adapter_size=4), log=lambda s: None)
    batches = seen[0]
    replay = [b for i, b in enumerate(batches) if i % 4 == 3]
    sft_rows = [b for i, b in enumerate(batches) if i % 4 != 3]
    assert all((b["labels"] != -100).all() and b["input_ids"].shape == (4, T) for b in replay)  # plain LM windows
    assert all((b["labels"] == -100).any() for b in sft_rows)  # prompts masked
    # replay windows come from the first 90% of the text only: never from the held-out tail
    tokens = D.text_tokens(lmforge.load(setup / "base").tokenizer, str(setup / "corpus.txt")).tolist()
    cut = int(round(len(tokens) * 0.9))
    head = tokens[:cut]
    for b in replay:
        for row in b["input_ids"].tolist():
            assert any(head[s:s + T] == row for s in range(cut - T + 1)), "a replay row that is not in the head"
    assert {"forgetting_ppl_before", "forgetting_ppl_after"} <= set(m)
    assert json.loads((tmp_path / "replay" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"


def test_forgetting_and_replay_errors(setup, tmp_path, capsys):
    from lmforge.cli import main

    with pytest.raises(ConfigError, match="replay_ratio"):
        _cfg(setup, tmp_path / "x", replay_data="builtin", replay_ratio=1.0)
    with pytest.raises(ConfigError, match="prompt tuning"):
        from lmforge.recipes.prompt_tune import PromptTuneConfig

        PromptTuneConfig(model="m", data="d", out="o", replay_data="builtin")
    rc = main(["finetune", "sft", str(setup / "base"), "--data", str(setup / "instr.json"), "--out",
               str(tmp_path / "y"), "--forgetting-data", str(tmp_path / "nope.txt"), "--progress", "false"])
    assert rc == 1
    assert "nope.txt: file not found" in capsys.readouterr().err
