"""Soft prompts: PEFT prompt-tuning round trips with identical logits, the KV-cache path, swapping, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import lmforge
from lmforge.finetune import prompt_tuning as pt
from lmforge.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64,
                                                                 n_positions=32, bos_token_id=0, eos_token_id=0))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
            intermediate_size=32, vocab_size=64, bos_token_id=0, eos_token_id=0))
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(d)
    return d


def _hf(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def test_lmforge_prompt_loads_in_peft(hf_dir, tmp_path):
    model = pt.add_prompt_tuning(lmforge.load(hf_dir).model, n_virtual=5, init_ids=[3, 4, 5]).eval()
    assert torch.equal(model.prompts["default"][3], model.base.wte.weight[3])  # text init, repeated to length
    with torch.no_grad():
        model.prompts["default"].add_(torch.randn(5, 16) * 0.5)
    ours = model(X)
    assert ours.shape == (2, 7, 64)
    pt.save_prompt(model, tmp_path / "p", base_model_name_or_path=str(hf_dir))
    pm = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path / "p").eval()
    theirs = pm(input_ids=X).logits  # (B, n + T, V): PEFT keeps the virtual positions
    torch.testing.assert_close(theirs[:, 5:], ours, rtol=0, atol=2e-6)
    # a left-padded row computes what the unpadded row computes (prompt, then the real tokens at positions n..)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    unpadded = pm(input_ids=X[:1, 2:]).logits[0, 5:]
    torch.testing.assert_close(model(X, attention_mask=mask)[0, 2:], unpadded, rtol=0, atol=2e-6)


def test_peft_prompt_loads_in_lmforge(hf_dir, tmp_path):
    torch.manual_seed(1)
    pm = peft.get_peft_model(_hf(hf_dir), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm.eval().save_pretrained(tmp_path / "p")
    model = pt.load_prompt(lmforge.load(hf_dir).model, tmp_path / "p").eval()
    torch.testing.assert_close(model(X), pm(input_ids=X).logits[:, 4:], rtol=0, atol=2e-6)


def test_cache_prefill_and_decode_match_full_forward(hf_dir):
    model = pt.add_prompt_tuning(lmforge.load(hf_dir).model, n_virtual=3).eval()
    full = model(X)  # (B, T, V)
    cache = model.new_cache(2, 16)
    first = model(X[:, :5], kv_cache=cache)
    nxt = model(X[:, 5:6], kv_cache=cache)
    torch.testing.assert_close(first, full[:, :5], rtol=0, atol=1e-5)
    torch.testing.assert_close(nxt[:, -1], full[:, 5], rtol=0, atol=1e-5)


def test_prompts_swap_and_only_the_prompt_trains(hf_dir):
    base = lmforge.load(hf_dir).model.eval()
    plain = base(X)
    model = pt.add_prompt_tuning(base, n_virtual=2, name="a")
    model.add_prompt("b", n_virtual=6)
    out_b = model(X)
    model.set_prompt("a")
    out_a = model(X)
    assert not torch.allclose(out_a, out_b)
    model.set_prompt(None)
    torch.testing.assert_close(model(X), plain)
    with pytest.raises(ConfigError, match="no soft prompt named 'c'"):
        model.set_prompt("c")
    model.set_prompt("a")
    model(X).logsumexp(-1).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"prompts.a"}


def test_wrong_base_is_an_error(hf_dir, tmp_path):
    model = pt.add_prompt_tuning(lmforge.load(hf_dir).model, n_virtual=2)
    pt.save_prompt(model, tmp_path / "p")
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer

    other = Transformer(ModelConfig.from_name("gpt-tiny", n_layer=1))
    with pytest.raises(CheckpointError, match="different base model"):
        pt.load_prompt(other, tmp_path / "p")
    with pytest.raises(CheckpointError, match="not PROMPT_TUNING"):
        from lmforge.finetune import lora

        lm = lmforge.load(hf_dir).model
        lora.add_lora(lm, "q_proj")
        lora.save_peft(lm, tmp_path / "l")
        pt.load_prompt(other, tmp_path / "l")
