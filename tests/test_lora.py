"""LoRA: PEFT round trips with identical logits (both directions), merge/unmerge, adapters swapped, bad input.

The oracle is Hugging Face `peft` itself, running on the `transformers` model that the same weights load into.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import lmforge
from lmforge.finetune import lora
from lmforge.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def _hf_model(kind: str, n_embd: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=n_embd, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=n_embd, intermediate_size=2 * n_embd, vocab_size=64,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory):
    """A tiny random HF checkpoint on disk (what `lmforge.load` and `from_pretrained` both read)."""
    d = tmp_path_factory.mktemp(request.param)
    _hf_model(request.param).save_pretrained(d)
    return request.param, d


def _load_hf(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def _randomize_B(model, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            for name in m.lora_B:
                m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=g) * std)


X = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))

TARGETS = {"gpt2": [["q_proj", "v_proj"], ["c_attn"], "all-linear", ["o_proj", "mlp.down_proj"]],
           "llama": [["q_proj", "v_proj"], "all-linear", ["k_proj", "gate_proj"]]}


def test_lmforge_adapter_loads_in_peft_with_identical_logits(hf_dir, tmp_path):
    kind, d = hf_dir
    for i, targets in enumerate(TARGETS[kind]):
        lm = lmforge.load(d)
        model = lm.model.eval()
        base_logits = model(X)
        lora.add_lora(model, targets, r=4, alpha=8)
        assert torch.equal(model(X), base_logits), "B starts at zero: the adapted model is the base model"
        _randomize_B(model, seed=i)
        ours = model(X)
        assert (ours - base_logits).abs().max() > 1e-2
        out = lora.save_peft(model, tmp_path / f"adapter{i}", base_model_name_or_path=str(d))
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] == (kind == "gpt2")
        theirs = peft.PeftModel.from_pretrained(_load_hf(d), out).eval()
        torch.testing.assert_close(theirs(input_ids=X).logits, ours, rtol=0, atol=2e-6)


def test_peft_adapter_loads_in_lmforge_with_identical_logits(hf_dir, tmp_path):
    kind, d = hf_dir
    specs = [dict(target_modules=["c_attn", "c_proj"] if kind == "gpt2" else ["q_proj", "v_proj"], r=4, lora_alpha=8),
             dict(target_modules="all-linear", r=2, lora_alpha=5, rank_pattern={"c_fc" if kind == "gpt2" else
                                                                                 "up_proj": 3},
                  alpha_pattern={"c_fc" if kind == "gpt2" else "up_proj": 7}),
             dict(target_modules="all-linear", r=4, lora_alpha=8, use_rslora=True)]
    for i, spec in enumerate(specs):
        hf = _load_hf(d)
        pm = peft.get_peft_model(hf, peft.LoraConfig(fan_in_fan_out=kind == "gpt2", **spec))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        pm.eval().save_pretrained(tmp_path / f"peft{i}")
        theirs = pm(input_ids=X).logits
        model = lmforge.load(d).model.eval()
        lora.load_peft(model, tmp_path / f"peft{i}")
        torch.testing.assert_close(model(X), theirs, rtol=0, atol=2e-6)
        if kind == "gpt2" and i == 0:  # PEFT's c_attn LoRA is one A shared by q, k and v
            attn = model.blocks[0].attn
            assert attn.q_proj.lora_A["default"] is attn.k_proj.lora_A["default"] is attn.v_proj.lora_A["default"]
        # and back out again: lmforge re-saves what it loaded, PEFT reads it, same logits
        lora.save_peft(model, tmp_path / f"again{i}")
        again = peft.PeftModel.from_pretrained(_load_hf(d), tmp_path / f"again{i}").eval()
        torch.testing.assert_close(again(input_ids=X).logits, theirs, rtol=0, atol=2e-6)


def test_trainable_count_matches_peft(hf_dir):
    kind, d = hf_dir
    for targets in TARGETS[kind][:2]:
        model = lmforge.load(d).model
        lora.add_lora(model, targets, r=4, alpha=8)
        trainable, total = lora.count_params(model)
        hf_targets = targets
        if kind == "gpt2" and targets == ["q_proj", "v_proj"]:
            continue  # no single HF module is q+v only in GPT-2 (PEFT has no equivalent count)
        pm = peft.get_peft_model(_load_hf(d), peft.LoraConfig(r=4, lora_alpha=8, target_modules=hf_targets,
                                                              fan_in_fan_out=kind == "gpt2"))
        ptrain, _ = pm.get_nb_trainable_parameters()
        assert trainable == ptrain
        assert lora.trainable_report(model).startswith("trainable ")


def test_report_text():
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer

    m = Transformer(ModelConfig.from_name("gpt-tiny", n_layer=2))
    lora.add_lora(m, ["q_proj", "v_proj"], r=8, alpha=16)
    t, n = lora.count_params(m)
    assert t == 2 * 2 * (8 * 128 + 128 * 8)  # layers x (q, v) x (A + B)
    assert n == m.config.num_params() + t  # the tied lm_head is counted once
    assert lora.trainable_report(m) == f"trainable 8.2K / {n / 1e3:.0f}K params ({100 * t / n:.2f}%)"


def test_merge_equals_unmerged_and_unmerge_restores(hf_dir):
    kind, d = hf_dir
    model = lmforge.load(d).model.eval()
    base = model(X)
    w0 = model.blocks[0].attn.q_proj.weight.clone()
    lora.add_lora(model, "all-linear", r=4, alpha=8)
    _randomize_B(model)
    unmerged = model(X)
    lora.merge(model)
    torch.testing.assert_close(model(X), unmerged, rtol=0, atol=1e-5)
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, w0)
    lora.unmerge(model)
    torch.testing.assert_close(model.blocks[0].attn.q_proj.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(X), unmerged, rtol=0, atol=1e-5)
    with lora.disable_adapters(model):
        torch.testing.assert_close(model(X), base, rtol=0, atol=1e-6)
    plain = lora.merge_and_unload(copy.deepcopy(model))
    assert not list(lora.lora_layers(plain))
    assert isinstance(plain.blocks[0].attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(plain(X), unmerged, rtol=0, atol=1e-5)


def test_several_adapters_swap_without_reloading(hf_dir, tmp_path):
    kind, d = hf_dir
    single = {}
    for name, seed in (("a", 1), ("b", 2)):
        m = lmforge.load(d).model.eval()
        lora.add_lora(m, ["q_proj", "v_proj"] if name == "a" else "all-linear", r=4, alpha=8, adapter_name=name)
        _randomize_B(m, seed=seed)
        single[name] = m(X)
        lora.save_peft(m, tmp_path / name, name=name)
    model = lmforge.load(d).model.eval()
    base = model(X)
    weight = model.blocks[0].attn.q_proj.weight
    lora.load_peft(model, tmp_path / "a", name="a")
    lora.load_peft(model, tmp_path / "b", name="b")
    assert lora.adapter_names(model) == ["a", "b"]
    for name in ("a", "b", "a"):
        lora.set_adapter(model, name)
        torch.testing.assert_close(model(X), single[name], rtol=0, atol=2e-6)
    lora.set_adapter(model, None)
    torch.testing.assert_close(model(X), base, rtol=0, atol=1e-6)
    assert model.blocks[0].attn.q_proj.weight is weight  # the base weights were never reloaded or copied
    with pytest.raises(ConfigError, match="no LoRA adapter named 'c'"):
        lora.set_adapter(model, "c")
    lora.delete_adapter(model, "b")
    assert lora.adapter_names(model) == ["a"]


def test_only_adapters_train():
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer

    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_name("llama-tiny", n_layer=2, vocab_size=64))
    lora.add_lora(m, ["q_proj", "v_proj"], r=2, alpha=4, dropout=0.1)
    before = {n: p.clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = m(X).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert any(".lora_B." in n for n in changed) and any(".lora_A." in n for n in changed)


def test_bad_target_and_wrong_base_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"LoRA target 'qproj' matches no linear layer") as e:
        m = lmforge.formats.hf.from_hf_model(_hf_model("llama"))
        lora.add_lora(m, ["q_proj", "qproj"])
    assert "\n" not in str(e.value)
    small = lmforge.formats.hf.from_hf_model(_hf_model("llama"))
    lora.add_lora(small, "all-linear", r=2)
    lora.save_peft(small, tmp_path / "llama16")
    wider = lmforge.formats.hf.from_hf_model(_hf_model("llama", n_embd=32))
    with pytest.raises(CheckpointError, match="different base model") as e:
        lora.load_peft(wider, tmp_path / "llama16")
    assert "\n" not in str(e.value) and not list(lora.lora_layers(wider))  # nothing half-loaded
    gpt2 = lmforge.formats.hf.from_hf_model(_hf_model("gpt2"))
    with pytest.raises(CheckpointError, match="does not exist in this model"):
        lora.load_peft(gpt2, tmp_path / "llama16")
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        lora.load_peft(gpt2, tmp_path)


def test_qlora_over_nf4_base_trains_and_saves(tmp_path):
    """QLoRA: adapters (fp32) over a frozen NF4 base; forward = dequantized base + LoRA; merge is refused."""
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer
    from lmforge.compress.quantize import QuantLinear, quantize_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", n_layer=2, vocab_size=64, n_embd=64, n_head=2, n_kv_head=1,
                                intermediate_size=128)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)  # becomes the float network with each quantized weight dequantized
    quantize_model(model, "nf4", group_size=32, embeddings="keep", progress=False)
    lora.add_lora(model, "all-linear", r=4, alpha=8)
    q = model.blocks[0].attn.q_proj
    assert isinstance(q.base, QuantLinear) and q.quantized and q.lora_A["default"].dtype == torch.float32
    _randomize_B(model, std=0.05)
    with torch.no_grad():
        for name, m in lora.lora_layers(model):
            ref.get_submodule(name).weight.copy_(m.base.dequantize())
    lora.add_lora(ref, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for (name, m), (_, mr) in zip(lora.lora_layers(model), lora.lora_layers(ref)):
            mr.lora_A["default"].copy_(m.lora_A["default"])
            mr.lora_B["default"].copy_(m.lora_B["default"])
    model.eval(), ref.eval()
    torch.testing.assert_close(model(X), ref(X), rtol=0, atol=1e-4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(X)[:, :-1].flatten(0, 1), X[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="quantized base"):
        lora.merge(model)
    lora.save_peft(model, tmp_path / "qlora")  # the adapter applies to the float model it came from
    assert json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_adapter_on_lmforge_model_matches_peft_on_its_hf_export(preset, tmp_path):
    """lmforge-native model -> `export_hf` -> transformers + peft with lmforge's adapter: identical logits."""
    from lmforge.formats.hf import export_hf
    from lmforge.models.config import ModelConfig
    from lmforge.lm import LM
    from lmforge.models.decoder import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset, n_layer=2, vocab_size=64, n_embd=32, n_head=2, block_size=32,
                                **({"n_kv_head": 1, "intermediate_size": 64} if preset == "llama-tiny" else {}))
    model = Transformer(cfg).eval()
    export_hf(LM(model, None, cfg), tmp_path / "hf")
    lora.add_lora(model, ["c_attn", "mlp.down_proj"] if preset == "gpt-tiny" else "all-linear", r=4, alpha=8)
    _randomize_B(model)
    lora.save_peft(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_load_hf(tmp_path / "hf"), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(input_ids=X).logits, model(X), rtol=0, atol=2e-6)
