"""Each fine-tuning recipe end to end on a tiny model (seconds), through Python and the command line."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.models.config import ModelConfig
from lmforge.lm import LM
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.bpe import Tokenizer

WORDS = "win prize call now free cash claim hello how are you see you at lunch today mom home late ok".split()


def _make_base(d, init_std: float = 0.02):
    """A tiny Llama-style model with a trained tokenizer, saved as an lmforge model directory."""
    from lmforge.finetune.data import ALPACA_PREAMBLE

    tok = Tokenizer.train([" ".join(WORDS * 30) + (ALPACA_PREAMBLE + "\n\n### Instruction:\n### Input:\n"
                                                    "### Response:\n") * 10], vocab_size=320, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                                intermediate_size=64, block_size=128, init_std=init_std)
    LM(Transformer(cfg), tok, cfg).save(d)
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _make_base(tmp_path_factory.mktemp("base"))


def _common(tmp_path, **kw):
    return dict(batch_size=4, progress=False, eval_every=0, eval_batches=0, device="cpu", **kw)


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    rng = random.Random(0)
    recs = []
    for i in range(24):
        a, b = rng.sample(WORDS, 2)
        recs.append({"instruction": f"say {a}", "input": "" if i % 2 else f"{b}", "output": f"{a} {a}",
                     "chosen": f"{a} {a}", "rejected": f"{b} lunch"})
    p = tmp_path_factory.mktemp("data") / "instr.json"
    p.write_text(json.dumps(recs))
    return p


def test_classify_recipe_and_cli(base, tmp_path, capsys):
    from lmforge.recipes.classify import ClassifyConfig, run_classify

    rng = random.Random(0)
    spam, ham = WORDS[:7], WORDS[7:]
    rows = [("spam", " ".join(rng.choices(spam, k=5))) if i % 3 == 0 else ("ham", " ".join(rng.choices(ham, k=5)))
            for i in range(60)]
    data = tmp_path / "sms.tsv"
    data.write_text("".join(f"{y}\t{t}\n" for y, t in rows))
    out = tmp_path / "clf"
    cfg = ClassifyConfig(model=str(base), data=str(data), out=str(out), max_steps=40, lr=3e-3, train_layers=-1,
                         balance=True, **_common(tmp_path))
    res = run_classify(cfg, log=lambda s: None)
    assert res["train"]["accuracy"] >= 0.9 and res["test"]["accuracy"] >= 0.8
    for f in ("classifier.json", "classifier_head.safetensors", "model.safetensors", "metrics.json",
              "confusion_train.png", "confusion_val.png", "confusion_test.png"):
        assert (out / f).exists(), f
    assert json.loads((out / "classifier.json").read_text())["labels"] == ["ham", "spam"]
    assert lmforge.load(out).config.n_layer == 2  # still an ordinary model directory
    capsys.readouterr()
    assert main(["classify", str(out), "win prize call now free"]) == 0
    label, prob = capsys.readouterr().out.split()
    assert label == "spam" and 0.5 < float(prob) <= 1.0
    assert main(["classify", str(tmp_path), "x"]) == 1
    assert "not a classifier directory" in capsys.readouterr().err


def test_sft_recipe_with_lora_merge_via_cli(base, alpaca, tmp_path):
    out = tmp_path / "sft"
    rc = main(["finetune", "sft", str(base), "--data", str(alpaca), "--out", str(out), "--max-steps", "30",
               "--lr", "1e-2", "--batch-size", "4", "--progress", "false", "--eval-every", "0",
               "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "all-linear", "--merge", "--max-new-tokens",
               "6", "--rouge-before"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_loss_after"] < m["val_loss_before"]
    assert 0.0 <= m["rouge_l_before"] <= 1.0 and 0.0 <= m["rouge_l"] <= 1.0
    answers = json.loads((out / "test_responses.json").read_text())
    assert answers and {"instruction", "output", "model_response"} <= set(answers[0])
    assert not (out / "adapter_config.json").exists()  # --merge: a plain model directory instead
    merged = lmforge.load(out)
    assert not any("lora" in n for n, _ in merged.model.named_parameters())


def test_sft_chat_packing_full_finetune(base, tmp_path):
    from lmforge.recipes.sft import SFTConfig, run_sft

    recs = [{"messages": [{"role": "user", "content": f"hello {w}"}, {"role": "assistant", "content": f"{w} ok"}]}
            for w in WORDS]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "chat"
    m = run_sft(SFTConfig(model=str(base), data=str(data), out=str(out), max_steps=6, packing=True, lr=3e-3,
                          max_new_tokens=4, max_length=64, **_common(tmp_path)), log=lambda s: None)
    assert m["val_loss_after"] < m["val_loss_before"]
    assert (out / "model.safetensors").exists() and (out / "test_responses.json").exists()


def test_sft_lora_adapter_output_and_bad_record(base, alpaca, tmp_path):
    from lmforge.finetune import lora
    from lmforge.errors import DataError
    from lmforge.recipes.sft import SFTConfig, run_sft

    out = tmp_path / "adapter"
    run_sft(SFTConfig(model=str(base), data=str(alpaca), out=str(out), max_steps=2, lora_r=2, eval_generate=0,
                      **_common(tmp_path)), log=lambda s: None)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2
    model = lmforge.load(base).model
    lora.load_peft(model, out)
    assert lora.adapter_names(model) == ["default"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError, match="record 1 has no 'output' field"):
        run_sft(SFTConfig(model=str(base), data=str(bad), out=str(tmp_path / "x"), val_data=str(bad),
                          **_common(tmp_path)), log=lambda s: None)


@pytest.mark.parametrize("variant", ["lora", "precompute"])
def test_dpo_recipe(base, alpaca, tmp_path, variant):
    from lmforge.recipes.dpo import DPOConfig, run_dpo

    out = tmp_path / "dpo"
    kw = dict(lora_r=4, lora_alpha=8, lora_targets=["all-linear"]) if variant == "lora" else dict(precompute_ref=True)
    m = run_dpo(DPOConfig(model=str(base), data=str(alpaca), out=str(out), max_steps=25, lr=1e-2, beta=0.5,
                          split=[0.6, 0.2, 0.2], **kw, **_common(tmp_path)), log=lambda s: None)
    assert m["before"]["pref_accuracy"] == 0.5 and m["before"]["reward_margin"] == 0.0  # policy == reference
    assert m["after"]["reward_margin"] > 0 and m["after"]["pref_accuracy"] > 0.5
    logged = [json.loads(x) for x in (out / "dpo_metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 25 and {"reward_margin", "pref_accuracy", "dpo_loss"} <= set(logged[-1])


def test_prompt_tune_recipe(alpaca, tmp_path):
    from lmforge.recipes.prompt_tune import PromptTuneConfig, run_prompt_tune
    from lmforge.finetune.prompt_tuning import load_prompt

    # a random model with small weights ignores its input; larger ones make the prompt matter
    base = _make_base(tmp_path / "base", init_std=0.3)
    out = tmp_path / "pt"
    m = run_prompt_tune(PromptTuneConfig(model=str(base), data=str(alpaca), out=str(out), max_steps=20,
                                         num_virtual_tokens=4, init_text="say", max_new_tokens=4, lr=0.3,
                                         val_data=str(alpaca), test_data=str(alpaca), eval_generate=4,
                                         **_common(tmp_path)), log=lambda s: None)
    assert m["val_loss_after"] < m["val_loss_before"] - 0.1  # loss on the training records themselves falls
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 4
    wrapped = load_prompt(lmforge.load(base).model, out, name="task")
    assert wrapped.active == "task"


def test_lora_classifier_and_qlora_sft(base, alpaca, tmp_path, capsys):
    from lmforge.errors import ConfigError
    from lmforge.recipes.classify import ClassifyConfig, run_classify
    from lmforge.recipes.sft import SFTConfig, run_sft

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} {w}", "label": "a" if i % 2 else "b"}) + "\n"
                            for i, w in enumerate(WORDS * 2)))
    out = tmp_path / "clf"
    run_classify(ClassifyConfig(model=str(base), data=str(data), out=str(out), max_steps=3, lora_r=2,
                                **_common(tmp_path)), log=lambda s: None)
    assert main(["classify", str(out), "hello hello", "--json"]) == 0  # adapters were merged into the saved copy
    assert set(json.loads(capsys.readouterr().out)["probabilities"]) == {"a", "b"}
    out = tmp_path / "qlora"
    run_sft(SFTConfig(model=str(base), data=str(alpaca), out=str(out), max_steps=2, lora_r=2, quantize="nf4",
                      eval_generate=2, max_new_tokens=2, **_common(tmp_path)), log=lambda s: None)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(ConfigError, match="set --lora-r"):
        SFTConfig(model=str(base), data=str(alpaca), out=str(out), quantize="nf4")


def test_lmforge_load_reads_an_adapter_dir(base, alpaca, tmp_path):
    from lmforge.finetune import lora

    lm = lmforge.load(base)
    lora.add_lora(lm.model, "all-linear", r=2)
    with torch.no_grad():
        for _, m in lora.lora_layers(lm.model):
            m.lora_B["default"].normal_(std=0.5)
    x = torch.randint(0, 300, (1, 6))
    want = lm.model.eval()(x)
    lora.save_peft(lm.model, tmp_path / "ad", base_model_name_or_path=str(base))
    got = lmforge.load(tmp_path / "ad")  # base + adapter, merged
    torch.testing.assert_close(got.model(x), want, rtol=0, atol=1e-5)
    assert got.tokenizer is not None and not list(lora.lora_layers(got.model))


@pytest.mark.parametrize("name", ["sms-spam", "sft-alpaca", "dpo-lora", "prompt-tune"])
def test_shipped_yaml_configs_load(name):
    from pathlib import Path

    from lmforge import argconf
    from lmforge.cli.finetune import _recipe

    recipe = {"sms-spam": "classify", "sft-alpaca": "sft", "dpo-lora": "dpo", "prompt-tune": "prompt-tune"}[name]
    cls, _ = _recipe(recipe)
    path = Path(__file__).resolve().parent.parent / "configs" / "finetune" / f"{name}.yaml"
    cfg = argconf.build(cls, argconf.load_yaml(path))
    assert cfg.batch_size >= 1
