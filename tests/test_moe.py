"""Mixture of experts (Mixtral, Qwen2-MoE) against the live oracles.

- logits of tiny random `MixtralForCausalLM` / `Qwen2MoeForCausalLM` checkpoints, loaded from the directory
  transformers writes and from a live transformers-5 model (fused 3-D experts), within 1e-5;
- export to Hugging Face layout: transformers 5 (and transformers 4, LMFORGE_TRANSFORMERS4) loads it, same logits;
- the load-balancing loss equals transformers' `load_balancing_loss_func`, and the training loss's gradient equals
  the gradient of transformers' own MoE loss (cross-entropy + router_aux_loss_coef * aux);
- the training loop logs router statistics; generation, quantization, LoRA (PEFT loads the adapter) and GGUF
  (llama.cpp's llama and qwen2moe architectures, read back with gguf's reader, and llama.cpp itself under the
  `llamacpp` marker) work on MoE models.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.formats.gguf import export_gguf, load_gguf  # noqa: E402
from lmforge.formats.hf import export_hf, from_hf_model, state_dict_from_hf  # noqa: E402
from lmforge.lm import LM  # noqa: E402
from lmforge.models.config import ModelConfig  # noqa: E402
from lmforge.models.decoder import SparseMoE, Transformer, collect_router_logits, load_balancing_loss  # noqa: E402
from lmforge.training.batch import next_token_loss  # noqa: E402
from lmforge.training.moe import RouterAuxLoss  # noqa: E402

V = 96
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)


def _make(kind: str):
    T = transformers
    if kind == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=4,
                                                    num_experts_per_tok=2, router_aux_loss_coef=0.02))
    if kind == "mixtral-top1-window-tied":
        return T.MixtralForCausalLM(T.MixtralConfig(**SMALL, intermediate_size=40, num_local_experts=3,
                                                    num_experts_per_tok=1, sliding_window=7, tie_word_embeddings=True))
    if kind == "qwen2_moe":
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=24,
                                                      shared_expert_intermediate_size=40, num_experts=6,
                                                      num_experts_per_tok=2, router_aux_loss_coef=0.01))
    if kind == "qwen2_moe-normtopk-tied":
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=16,
                                                      shared_expert_intermediate_size=24, num_experts=4,
                                                      num_experts_per_tok=3, norm_topk_prob=True,
                                                      tie_word_embeddings=True))
    raise ValueError(kind)


KINDS = ["mixtral", "mixtral-top1-window-tied", "qwen2_moe", "qwen2_moe-normtopk-tied"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> (directory written by save_pretrained, the transformers model)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf-moe")
    out = {}
    for kind in KINDS:
        m = _make(kind).eval()
        with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so a wrong mapping shows
            for name, p in m.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        m.save_pretrained(root / kind)
        out[kind] = (root / kind, m)
    return out


def _ids(T=20, B=2, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _tiny(shared: int = 0, norm_topk: bool = True, seed: int = 0, **kw) -> Transformer:
    cfg = ModelConfig.from_name("mixtral-tiny", **{**dict(vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                                          intermediate_size=24, num_experts=4, block_size=64,
                                                          shared_expert_intermediate_size=shared,
                                                          norm_topk_prob=norm_topk, qkv_bias=bool(shared)), **kw})
    torch.manual_seed(seed)
    return Transformer(cfg)


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------
def test_config_counts_and_errors():
    for shared in (0, 20):
        model = _tiny(shared)
        assert model.config.num_params() == model.num_params()
        assert isinstance(model.blocks[0].mlp, SparseMoE) and len(model.blocks[0].mlp.experts) == 4
        moe = model.blocks[0].mlp
        per_expert = sum(p.numel() for p in moe.experts[0].parameters())
        assert model.config.num_params(active=True) == model.num_params() - 2 * 2 * per_expert  # 2 idle of 4, x2 layers
    assert _tiny().config.moe_intermediate_size == 24  # Mixtral: experts as wide as intermediate_size
    with pytest.raises(ConfigError, match="num_experts_per_tok must be between 1 and num_experts=4"):
        ModelConfig(num_experts=4, num_experts_per_tok=5, mlp="swiglu")
    with pytest.raises(ConfigError, match="SwiGLU experts"):
        ModelConfig(num_experts=4)
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        ModelConfig(num_experts=4, mlp="swiglu", router_aux_loss_coef=-1.0)
    dense = ModelConfig.from_name("llama-tiny")
    assert dense.num_experts == 0 and dense.moe_intermediate_size is None
    assert type(Transformer(dense).blocks[0].mlp).__name__ == "MLP"  # the dense path is untouched


# ------------------------------------------------------------------------------------------------------------------
# Hugging Face parity, import and export
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_hf_dir_logits_match(hf_dirs, kind):
    d, ref = hf_dirs[kind]
    lm = lmforge.load(d)
    assert lm.config.num_experts == ref.config.num_experts
    ids = _ids()
    torch.testing.assert_close(_logits(lm.model, ids), _logits(ref, ids), atol=1e-5, rtol=0)
    # the live transformers-5 model holds its experts fused in 3-D tensors: from_hf_model splits them
    torch.testing.assert_close(_logits(from_hf_model(ref).eval(), ids), _logits(ref, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_transformers(hf_dirs, tmp_path, kind):
    d, ref = hf_dirs[kind]
    lm = lmforge.load(d)
    out = export_hf(lm, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == type(ref).__name__
    ids = _ids(seed=2)
    torch.testing.assert_close(_logits(back, ids), _logits(ref, ids), atol=1e-5, rtol=0)
    lm.save(tmp_path / "native")  # and the lmforge directory round trip is exact
    again = lmforge.load(tmp_path / "native")
    assert again.config.num_experts == lm.config.num_experts
    torch.testing.assert_close(_logits(again.model, ids), _logits(lm.model, ids), atol=0, rtol=0)


def test_trained_from_scratch_exports_to_both_families(tmp_path):
    for shared, family in ((0, "MixtralForCausalLM"), (20, "Qwen2MoeForCausalLM")):
        model = _tiny(shared, norm_topk=not shared).eval()
        lm = LM(model, None, model.config)
        out = export_hf(lm, tmp_path / family)
        back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(back).__name__ == family
        ids = _ids(seed=3)
        torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="Mixtral renormalizes"):
        export_hf(LM(_tiny(0, norm_topk=False), None, _tiny(0, norm_topk=False).config), tmp_path / "bad")


_T4_ORACLE = r"""
import json, sys, torch, transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
args = json.loads(sys.argv[1])
assert transformers.__version__.startswith("4."), transformers.__version__
out = {}
for name, path in args["dirs"].items():
    m = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out[name] = m(torch.tensor(args["ids"])).logits.tolist()
gates = tuple(torch.tensor(g) for g in args["gates"])
out["aux"] = float(load_balancing_loss_func(gates, args["E"], args["k"]))
out["aux_masked"] = float(load_balancing_loss_func(gates, args["E"], args["k"], torch.tensor(args["mask"])))
print(json.dumps(out))
"""


def test_transformers4_loads_the_export_and_agrees_on_the_aux_loss(hf_dirs, tmp_path):
    path = os.environ.get("LMFORGE_TRANSFORMERS4")
    if not path:
        pytest.skip("set LMFORGE_TRANSFORMERS4 to a directory holding transformers 4 to compare with it")
    dirs, ids = {}, _ids(seed=4)
    for kind in ("mixtral", "qwen2_moe"):
        dirs[kind] = str(export_hf(lmforge.load(hf_dirs[kind][0]), tmp_path / kind))
    g = torch.Generator().manual_seed(5)
    E, k, B, T = 6, 2, 2, 5
    gates = [torch.randn(B * T, E, generator=g) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRANSFORMERS_VERBOSITY="error")
    args = json.dumps({"dirs": dirs, "ids": ids.tolist(), "gates": [x.tolist() for x in gates], "E": E, "k": k,
                       "mask": mask.tolist()})
    res = subprocess.run([sys.executable, "-c", _T4_ORACLE, args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    for kind in dirs:
        torch.testing.assert_close(torch.tensor(theirs[kind]), _logits(hf_dirs[kind][1], ids), atol=1e-5, rtol=0)
    assert float(load_balancing_loss(gates, E, k)) == pytest.approx(theirs["aux"], abs=1e-6)
    assert float(load_balancing_loss(gates, E, k, mask)) == pytest.approx(theirs["aux_masked"], abs=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The load-balancing loss and training
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,k", [(4, 1), (6, 2), (8, 3)])
def test_load_balancing_loss_equals_transformers(E, k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(E * 10 + k)
    B, T = 3, 7
    gates = tuple(torch.randn(B * T, E, generator=g) * 2 for _ in range(3))
    torch.testing.assert_close(load_balancing_loss(gates, E, k), load_balancing_loss_func(gates, E, k))
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    torch.testing.assert_close(load_balancing_loss(gates, E, k, mask), load_balancing_loss_func(gates, E, k, mask))
    # bounds: k for a perfectly even load and router, E when every token goes to the same k experts
    even = torch.zeros(E * 4, E)
    assert float(load_balancing_loss([even], E, k)) == pytest.approx(k)
    collapsed = torch.zeros(16, E)
    collapsed[:, :k] = 30.0
    assert float(load_balancing_loss([collapsed], E, k)) == pytest.approx(E, rel=1e-4)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_training_loss_gradient_equals_transformers(hf_dirs, kind):
    """RouterAuxLoss(next_token_loss): value = the cross-entropy, gradient = that of transformers' MoE loss
    (cross-entropy + router_aux_loss_coef * load-balancing loss), on every weight."""
    d, _ = hf_dirs[kind]
    ref = transformers.AutoModelForCausalLM.from_pretrained(d)
    ref.train()
    ours = lmforge.load(d).model
    ours.train()
    ids = _ids(T=16, seed=6)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # the last position is not scored
    hf_labels = torch.cat([torch.full((2, 1), -100), targets[:, :-1]], dim=1)  # transformers shifts its labels
    out = ref(ids, labels=hf_labels, output_router_logits=True)
    out.loss.backward()
    loss_fn = RouterAuxLoss(next_token_loss, ours.config)
    loss = loss_fn(ours, {"input_ids": ids, "labels": targets})
    loss.backward()
    aux = float(out.aux_loss.detach())
    assert float(loss.detach()) == pytest.approx(float(out.loss.detach()) - ref.config.router_aux_loss_coef * aux,
                                                 abs=1e-5)  # the value returned is the cross-entropy alone
    assert loss_fn.pop_stats()["aux_loss"] == pytest.approx(aux, abs=1e-5)
    # transformers' gradients under lmforge's names: the same conversion as its weights (fused experts split)
    expected = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    hf_grads = state_dict_from_hf({n: p.grad for n, p in ref.named_parameters()}, ours.config, expected, "grads")
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_router_logits_are_collected_per_forward():
    model = _tiny().eval()
    ids = _ids()
    with collect_router_logits() as logits:
        model(ids)
    assert len(logits) == 2 and logits[0].shape == (ids.numel(), 4)
    model(ids)  # outside the block nothing is kept
    assert len(logits) == 2


def test_aux_loss_leaves_out_forwards_without_gradients():
    """A loss that also runs a frozen reference pass (DPO) balances the trained forward's routing only."""
    model = _tiny().train()
    ids, other = _ids(seed=7), _ids(seed=8)

    def with_reference(m, batch):
        with torch.no_grad():
            m(other)  # the reference pass: its router logits must not count
        return next_token_loss(m, batch)

    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    both, alone = RouterAuxLoss(with_reference, model.config), RouterAuxLoss(next_token_loss, model.config)
    both(model, batch), alone(model, batch)
    assert both.pop_stats() == alone.pop_stats()


def test_train_logs_router_statistics(tmp_path):
    from lmforge.training.loop import TrainConfig, read_metrics, train

    model = _tiny(seed=1)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, V, (4, 17), generator=g) for _ in range(4)]
    batches = [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in rows]
    result = train(model, batches, TrainConfig(max_steps=4, lr=3e-3, warmup_steps=1, progress=False, cores=2,
                                               eval_every=0), val_data=batches[:1], out_dir=tmp_path / "run")
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and result.train_loss == recs[-1]["loss"]
    for r in recs:
        assert len(r["router_load"]) == 2 and all(len(row) == 4 and abs(sum(row) - 1) < 1e-3
                                                  for row in r["router_load"])
        assert 2.0 - 1e-3 <= r["aux_loss"] <= 4.0 and all(0 < e <= 1 for e in r["router_entropy"])
    assert (tmp_path / "run" / "router_load.png").stat().st_size > 1000
    # the logged loss is the language-model loss alone, as for a dense model (the aux term adds only gradient)
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        assert float(next_token_loss(model, batches[0])) == pytest.approx(result.val_loss, abs=1e-5)


def test_idle_experts_get_zero_gradients_in_training():
    model = _tiny()
    model.train()
    ids = torch.zeros(1, 3, dtype=torch.long)  # 3 tokens x top-2: at most 6 of the 8 (layer, expert) pairs busy
    next_token_loss(model, {"input_ids": ids, "labels": ids}).backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter to get a gradient


# ------------------------------------------------------------------------------------------------------------------
# Generation, quantization
# ------------------------------------------------------------------------------------------------------------------
def test_generate_with_cache_equals_full_recompute(hf_dirs):
    from lmforge.generation import decode
    from lmforge.generation.loop import generate_ids
    from lmforge.generation.sampling import SamplingParams

    lm = lmforge.load(hf_dirs["qwen2_moe"][0])
    assert decode.decoder_for(lm.model) is None  # the fused dense decode step stands aside
    prompts = [[5, 6, 7, 8], [9, 10]]
    p = SamplingParams(temperature=0.0, max_new_tokens=8)
    cached = [r.token_ids for r in generate_ids(lm.model, prompts, p)]
    full = [r.token_ids for r in generate_ids(lm.model, prompts, p, use_cache=False)]
    assert cached == full
    ref = hf_dirs["qwen2_moe"][1]
    want = ref.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False)[0, 4:].tolist()
    assert cached[0] == want


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_moe(tmp_path, monkeypatch, method):
    from lmforge.compress.quantize import QuantLinear, quantize_model

    monkeypatch.setenv("LMFORGE_KERNEL_CHECK", "fallback")  # dequantize + F.linear: no kernel checks (test_quant's)

    model = _tiny(seed=2).eval()
    ids = _ids()
    ref = _logits(model, ids)
    calib = _ids(T=8, B=1, seed=9) if method == "gptq" else None  # 8 tokens x top-2: some experts get none
    q = quantize_model(copy.deepcopy(model), "int8", calibration=calib, embeddings="keep", progress=False)
    assert isinstance(q.blocks[0].mlp.experts[3].down_proj, QuantLinear)
    assert type(q.blocks[0].mlp.router) is torch.nn.Linear  # routers stay float
    out = _logits(q, ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    lm = LM(q, None, model.config)
    lm.save(tmp_path / "q")
    torch.testing.assert_close(_logits(lmforge.load(tmp_path / "q").model, ids), out, atol=0, rtol=0)


def test_lora_on_experts_loads_in_peft(tmp_path):
    """LoRA on every expert's projections, saved in PEFT's layout, gives the same logits in PEFT on the HF export."""
    peft = pytest.importorskip("peft")
    from lmforge.finetune import lora

    base = _tiny(seed=3).eval()
    export_hf(LM(base, None, base.config), tmp_path / "hf")
    model = copy.deepcopy(base)
    lora.add_lora(model, ["q_proj", "gate_proj", "up_proj", "down_proj"], r=4)  # PEFT wants w1 and w3 together
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for b in layer.lora_B.values():
                b.normal_()  # B starts at zero: make the adapters matter
    lora.save_peft(model, tmp_path / "adapter")
    ids = _ids()
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                        tmp_path / "adapter").eval()
    want = _logits(model, ids)
    assert (want - _logits(base, ids)).abs().max() > 0.1
    torch.testing.assert_close(_logits(hf, ids), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe():
    from lmforge.tokenizers.bpe import Tokenizer
    from lmforge.training.data import builtin_corpus

    return Tokenizer.train([builtin_corpus()[:30000]], vocab_size=320, progress=False)


@pytest.fixture(scope="module")
def tiny_moe_lm(bpe):
    """A Mixtral-block model with a byte-level BPE trained here, weights sharp enough for clear greedy choices."""
    cfg = ModelConfig.from_name("mixtral-tiny", vocab_size=bpe.vocab_size, n_layer=2, n_embd=64, n_head=4,
                                n_kv_head=2, intermediate_size=64, num_experts=4, block_size=128, init_std=0.1,
                                tie_word_embeddings=False)
    torch.manual_seed(0)
    return LM(Transformer(cfg).eval(), bpe, cfg)


@pytest.fixture(scope="module")
def tiny_qwen2_moe_lm(bpe):
    """A Qwen2-MoE-block model (q/k/v biases, raw top-k weights, a shared expert), tied head."""
    cfg = ModelConfig.from_name("mixtral-tiny", vocab_size=bpe.vocab_size, n_layer=2, n_embd=64, n_head=4,
                                n_kv_head=2, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                shared_expert_intermediate_size=48, norm_topk_prob=False, qkv_bias=True,
                                block_size=128, init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)  # biases start at zero: make a wrong mapping show
    return LM(model, bpe, cfg)


def test_gguf_moe_tensors_and_round_trip(tiny_moe_lm, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = export_gguf(tiny_moe_lm, tmp_path / "moe.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    c = tiny_moe_lm.config
    assert kv["general.architecture"] == "llama"
    assert (kv["llama.expert_count"], kv["llama.expert_used_count"]) == (4, 2)
    assert kv["llama.feed_forward_length"] == c.moe_intermediate_size
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}  # ggml order: innermost first
    C, He, E = c.n_embd, c.moe_intermediate_size, c.num_experts
    for i in range(c.n_layer):
        assert shapes[f"blk.{i}.ffn_gate_inp.weight"] == (C, E)
        assert shapes[f"blk.{i}.ffn_gate_exps.weight"] == (C, He, E)
        assert shapes[f"blk.{i}.ffn_up_exps.weight"] == (C, He, E)
        assert shapes[f"blk.{i}.ffn_down_exps.weight"] == (He, C, E)
        assert f"blk.{i}.ffn_gate.weight" not in shapes
    tensors = {t.name: t for t in reader.tensors}
    stacked = np.asarray(tensors["blk.1.ffn_down_exps.weight"].data).reshape(E, C, He)
    expert_3 = tiny_moe_lm.model.blocks[1].mlp.experts[3]
    np.testing.assert_array_equal(stacked[3], expert_3.down_proj.weight.detach().numpy())  # expert j at [j]
    back = load_gguf(path)
    assert (back.config.num_experts, back.config.num_experts_per_tok) == (4, 2)
    ids = torch.tensor([tiny_moe_lm.tokenizer.encode("The def statement")])
    torch.testing.assert_close(_logits(back.model, ids), _logits(tiny_moe_lm.model, ids), atol=1e-5, rtol=0)
    q8 = load_gguf(export_gguf(tiny_moe_lm, tmp_path / "moe-q8.gguf", "q8_0"))  # 3-D tensors quantize by rows
    assert (_logits(q8.model, ids) - _logits(tiny_moe_lm.model, ids)).abs().max() < 0.5


def test_gguf_qwen2_moe_is_llama_cpps_qwen2moe(tiny_qwen2_moe_lm, tmp_path):
    gguf = pytest.importorskip("gguf")
    lm, c = tiny_qwen2_moe_lm, tiny_qwen2_moe_lm.config
    path = export_gguf(lm, tmp_path / "q.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    assert kv["general.architecture"] == "qwen2moe"
    assert (kv["qwen2moe.expert_count"], kv["qwen2moe.expert_used_count"]) == (4, 2)
    assert (kv["qwen2moe.expert_feed_forward_length"], kv["qwen2moe.expert_shared_feed_forward_length"]) == (32, 48)
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (c.n_embd,)
    assert shapes["blk.0.ffn_down_shexp.weight"] == (48, c.n_embd) and shapes["blk.0.attn_q.bias"] == (c.n_embd,)
    assert "output.weight" in shapes  # qwen2moe always reads an output matrix, tied or not
    back = load_gguf(path)
    assert back.config.shared_expert_intermediate_size == 48 and back.config.tie_word_embeddings
    ids = torch.tensor([lm.tokenizer.encode("The def statement")])
    torch.testing.assert_close(_logits(back.model, ids), _logits(lm.model, ids), atol=1e-5, rtol=0)


def test_gguf_refuses_what_llama_cpp_would_run_differently(bpe, tmp_path):
    for shared, norm_topk, match in ((20, True, "norm_topk_prob=False .llama.cpp does not renormalize"),
                                     (0, False, "renormalizes the top-k weights")):
        model = _tiny(shared=shared, norm_topk=norm_topk, qkv_bias=True, vocab_size=bpe.vocab_size)
        with pytest.raises(ConfigError, match=match):
            export_gguf(LM(model, bpe, model.config), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.llamacpp
@pytest.mark.parametrize("which", ["mixtral", "qwen2_moe"])
def test_llama_cpp_runs_the_moe_export_as_lmforge_does(tiny_moe_lm, tiny_qwen2_moe_lm, tmp_path, which):
    from test_gguf import _ours_greedy, llama_cpp_greedy, llama_cpp_nll

    lm = tiny_moe_lm if which == "mixtral" else tiny_qwen2_moe_lm
    path = export_gguf(lm, tmp_path / "moe.gguf", "f32")
    prompt = lm.tokenizer.encode("The def statement")
    assert llama_cpp_greedy(path, prompt, 30) == _ours_greedy(lm, prompt, 30)[:30]
    ids = lm.tokenizer.encode("The def statement defines a function object and binds it to a name.")
    with torch.no_grad():
        ours = torch.nn.functional.cross_entropy(lm.model(torch.tensor([ids]))[0, :-1], torch.tensor(ids[1:])).item()
    assert abs(llama_cpp_nll(path, ids) - ours) < 1e-3  # the same next-token distribution, position by position


# ------------------------------------------------------------------------------------------------------------------
# The shipped config
# ------------------------------------------------------------------------------------------------------------------
def test_moe_demo_config_pretrains(tmp_path, capsys):
    from pathlib import Path

    from lmforge.cli import main

    cfg = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "moe-demo.yaml"
    out = tmp_path / "moe"
    assert main(["pretrain", "--config", str(cfg), "--out", str(out), "--max-steps", "3", "--batch-size", "2",
                 "--block-size", "32", "--vocab-size", "300", "--n-layer", "1", "--eval-every", "0",
                 "--eval-batches", "1", "--save-every", "0", "--sample-every", "0", "--progress", "false",
                 "--threads", "1"]) == 0
    lm = lmforge.load(out)
    assert lm.config.num_experts == 8 and lm.config.num_experts_per_tok == 2
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "aux_loss" in r] == [1, 2, 3]
    assert (out / "router_load.png").exists()


def test_prune_refuses_a_mixture_of_experts_with_one_line(tiny_moe_lm):
    from lmforge.compress.prune import prune_model

    with pytest.raises(ConfigError, match="mixture-of-experts model \\(4 experts per layer\\) is not supported"):
        prune_model(tiny_moe_lm.model, torch.zeros(1, 8, dtype=torch.long), n_layer=1)
