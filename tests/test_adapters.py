"""Bottleneck adapters (lmforge.finetune.adapters): the math against an independent reference, training, files,
swapping, generation through the fast decode step, and the SFT recipe end to end.

PEFT has no bottleneck (Houlsby) adapter to compare with, so the reference is the definition itself, written a
second way: forward hooks on the *unwrapped* base model add h + W_up f(W_down h + b_down) + b_up to each
projection's output, and the wrapped model must give the same logits.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.errors import CheckpointError, ConfigError
from lmforge.finetune import adapters as A
from lmforge.generation import decode
from lmforge.lm import LM
from lmforge.models.config import ModelConfig
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.bpe import Tokenizer

WORDS = "win prize call now free cash claim hello how are you see you at lunch today mom home late ok".split()
REF_ACT = {"gelu": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


def tiny(family: str = "llama", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    name = {"llama": "llama-tiny", "gpt": "gpt-tiny", "moe": "mixtral-tiny"}[family]
    extra = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16} if family == "moe" else {}
    cfg = ModelConfig.from_name(name, vocab_size=97, n_layer=2, n_embd=32, n_head=4, n_kv_head=4 if family == "gpt"
                                else 2, intermediate_size=64, block_size=64, dropout=0.0, **extra)
    return Transformer(cfg).eval()


def randomize(model, name: str, seed: int, std: float = 0.3) -> None:
    """Non-zero adapter weights (a trained adapter), so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in A.adapter_layers(model):
            for p in (m.adapters[name].parameters() if name in m.adapters else []):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def reference_logits(base: Transformer, adapted: Transformer, name: str, x: torch.Tensor) -> torch.Tensor:
    """The definition, by hooks on the plain model: each projection's output h becomes h + up(f(down(h)))."""
    hooks = []
    for lname, m in A.adapter_layers(adapted):
        if name not in m.adapters:
            continue
        ad = m.adapters[name]
        Wd, bd, Wu, bu = (t.detach() for t in (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias))
        f = REF_ACT[ad.activation]
        hooks.append(base.get_submodule(lname).register_forward_hook(
            lambda mod, inp, h, Wd=Wd, bd=bd, Wu=Wu, bu=bu, f=f: h + f(h @ Wd.T + bd) @ Wu.T + bu))
    try:
        return base(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family,where,act", [("llama", ("attn", "mlp"), "gelu"), ("gpt", ("mlp",), "relu"),
                                              ("gpt", ("attn",), "silu"), ("llama", ("attn", "mlp"), "tanh"),
                                              ("moe", ("attn", "mlp"), "gelu")])
def test_zero_init_is_the_base_and_trained_weights_match_the_definition(family, where, act):
    base = tiny(family)
    model = tiny(family)
    x = torch.randint(0, 97, (2, 11))
    want = base(x)
    names = A.add_adapters(model, size=8, where=where, activation=act)
    assert len(names) == 2 * len(where)
    assert torch.equal(model(x), want)  # W_up = 0: exactly the base function
    randomize(model, "default", seed=1)
    got = model(x)
    assert (got - want).abs().max() > 1e-2  # the adapters now matter ...
    torch.testing.assert_close(got, reference_logits(base, model, "default", x), rtol=1e-5, atol=1e-5)  # ... as defined
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == A.bottleneck_params(32, 8, len(names))


def test_only_adapters_train():
    model = tiny().train()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    A.add_adapters(model, size=4)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=0.5)
    x = torch.randint(0, 97, (3, 9))
    for step in range(3):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        if step == 0:  # up gets a gradient at once (down is random); down only once up is non-zero
            ups = [m.adapters["default"].up.weight.grad for _, m in A.adapter_layers(model)]
            assert all(g is not None and g.abs().sum() > 0 for g in ups)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
    downs = [m.adapters["default"].down.weight.grad for _, m in A.adapter_layers(model)]
    assert all(g.abs().sum() > 0 for g in downs)
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert state.keys() == frozen.keys() and all(torch.equal(state[k], frozen[k]) for k in frozen)


def test_save_load_round_trip_swap_and_disable(tmp_path):
    model = tiny()
    base = tiny()
    x = torch.randint(0, 97, (2, 10))
    base_logits = base(x)
    A.add_adapters(model, size=6, name="a")
    randomize(model, "a", seed=2)
    A.add_adapters(model, size=3, where="mlp", name="b", activation="relu")
    randomize(model, "b", seed=3)
    assert A.adapter_names(model) == ["a", "b"] and A.active_adapter(model) == "b"
    want_b = model(x)
    A.set_adapter(model, "a")
    want_a = model(x)
    torch.testing.assert_close(want_a, reference_logits(tiny(), model, "a", x), rtol=1e-5, atol=1e-5)
    # b sits after the MLP only: where it is absent the projection runs plain
    A.set_adapter(model, "b")
    assert torch.equal(model(x), want_b)
    torch.testing.assert_close(want_b, reference_logits(tiny(), model, "b", x), rtol=1e-5, atol=1e-5)
    with A.disable_adapters(model):
        assert torch.equal(model(x), base_logits)
    assert torch.equal(model(x), want_b)  # restored
    A.set_adapter(model, None)
    assert torch.equal(model(x), base_logits)

    A.save_adapter(model, tmp_path / "a", name="a", base_model_name_or_path="somewhere")
    A.save_adapter(model, tmp_path / "b", name="b")
    cfg = json.loads((tmp_path / "a" / A.ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["adapter_size"] == 6 and cfg["where"] == ["attn", "mlp"]
    assert cfg["base_model_name_or_path"] == "somewhere" and A.is_adapter_dir(tmp_path / "a")
    fresh = tiny()
    A.load_adapter(fresh, tmp_path / "a", name="task-a")
    A.load_adapter(fresh, tmp_path / "b", name="task-b")
    assert torch.equal(fresh(x), want_b)
    A.set_adapter(fresh, "task-a")
    assert torch.equal(fresh(x), want_a)
    A.delete_adapter(fresh, "task-a")
    assert A.adapter_names(fresh) == ["task-b"] and len(A.adapter_layers(fresh)) == 2  # attn projections unwrapped
    A.set_adapter(fresh, "task-b")
    assert torch.equal(fresh(x), want_b)
    A.remove_adapters(fresh)
    assert not A.adapter_layers(fresh) and torch.equal(fresh(x), base_logits)


def test_errors(tmp_path):
    model = tiny()
    with pytest.raises(ConfigError, match="positive integer"):
        A.add_adapters(model, size=0)
    with pytest.raises(ConfigError, match="attn, mlp"):
        A.add_adapters(model, where="ffn")
    with pytest.raises(ConfigError, match="activation"):
        A.add_adapters(model, activation="softmax")
    A.add_adapters(model, size=4)
    with pytest.raises(ConfigError, match="already has an adapter"):
        A.add_adapters(model, size=4)
    with pytest.raises(ConfigError, match="no bottleneck adapter named 'x'"):
        A.set_adapter(model, "x")
    A.save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)
    wider = Transformer(ModelConfig.from_name("llama-tiny", vocab_size=97, n_layer=2, n_embd=48, n_head=4,
                                              n_kv_head=2, intermediate_size=64, block_size=64))
    with pytest.raises(CheckpointError, match="n_embd=32"):
        A.load_adapter(wider, tmp_path / "ad")
    assert not A.adapter_layers(wider)  # nothing changed
    with pytest.raises(CheckpointError, match="not an adapter directory"):
        A.load_adapter(tiny(), tmp_path)
    # saving the adapted model as a plain model directory would write keys no loader reads back: refused, and
    # nothing is written
    with pytest.raises(ConfigError, match="carries adapters .*AdaptedProjection.*save_adapter"):
        LM(model, None).save(tmp_path / "full")
    assert not (tmp_path / "full").exists()
    from lmforge.finetune import lora

    lora_model = tiny()
    lora.add_lora(lora_model, r=2)
    with pytest.raises(ConfigError, match="LoRALinear.*merge_and_unload"):
        LM(lora_model, None).save(tmp_path / "full")
    lora.merge_and_unload(lora_model)
    LM(lora_model, None).save(tmp_path / "full")  # merged: a plain model again
    assert lmforge.load(tmp_path / "full").model.num_params() == tiny().num_params()


def _greedy(lm, prompts, **kw):
    return [list(c.token_ids) for c in lm.generate(prompts, max_new_tokens=12, temperature=0.0, **kw)]


def test_generation_through_the_decode_step():
    """The fast decode step lays out plain nn.Linear projections only: with adapters it must run the model's own
    modules (adapters included) and give what the uncached forward gives."""
    tok = Tokenizer.train([" ".join(WORDS * 20)], vocab_size=300, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                intermediate_size=64, block_size=64, init_std=0.2)
    lm = LM(Transformer(cfg).eval(), tok, cfg)
    prompts = ["hello how are", "win prize call now free cash"]  # different lengths: left padding, masked steps
    plain = _greedy(lm, prompts)
    assert decode.fused_weights(lm.model) is not None  # the plain model has fused decode weights
    A.add_adapters(lm.model, size=8)
    randomize(lm.model, "default", seed=4, std=0.5)
    assert decode.fused_weights(lm.model) is None and decode.decoder_for(lm.model) is not None
    ref = _greedy(lm, prompts, use_cache=False)
    assert ref != plain  # the adapters change the answers ...
    assert _greedy(lm, prompts) == ref  # ... and the eager decode step runs them
    assert _greedy(lm, prompts, static=True) == ref  # the static-shape step (what torch.compile runs) too
    # the step's logits against the model's own cached forward
    ids = torch.tensor([tok.encode("hello how are you")])
    cache = lm.model.new_cache(1, 16)
    with torch.no_grad():
        lm.model(ids[:, :-1], kv_cache=cache)
        want = lm.model(ids[:, -1:], kv_cache=cache)[:, -1]
        cache2 = lm.model.new_cache(1, 16)
        lm.model(ids[:, :-1], kv_cache=cache2)
        dec = decode.decoder_for(lm.model).begin()
        got = dec.step(ids[:, -1:], torch.ones(1, dtype=torch.bool), cache2, span=ids.shape[1], dense=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with A.disable_adapters(lm.model):
        assert _greedy(lm, prompts) == plain


# ----------------------------------------------------------------------------------------------------------------
# The SFT recipe
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from lmforge.finetune.data import ALPACA_PREAMBLE

    tok = Tokenizer.train([" ".join(WORDS * 30) + (ALPACA_PREAMBLE + "\n\n### Instruction:\n### Input:\n"
                                                    "### Response:\n") * 10], vocab_size=320, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                                intermediate_size=64, block_size=128)
    d = tmp_path_factory.mktemp("base")
    LM(Transformer(cfg), tok, cfg).save(d)
    return d


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    rng = random.Random(0)
    recs = []
    for i in range(24):
        a, b = rng.sample(WORDS, 2)
        recs.append({"instruction": f"say {a}", "input": "" if i % 2 else b, "output": f"{a} {a}"})
    p = tmp_path_factory.mktemp("data") / "instr.json"
    p.write_text(json.dumps(recs))
    return p


def test_sft_recipe_trains_saves_and_loads_bottleneck_adapters(base_dir, alpaca, tmp_path, capsys):
    from lmforge.cli import main

    before = (base_dir / "model.safetensors").read_bytes()
    out = tmp_path / "bn"
    rc = main(["finetune", "sft", str(base_dir), "--data", str(alpaca), "--out", str(out), "--max-steps", "25",
               "--lr", "1e-2", "--batch-size", "4", "--progress", "false", "--eval-every", "0", "--adapter",
               "bottleneck", "--adapter-size", "8", "--max-new-tokens", "4", "--eval-generate", "3"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_loss_after"] < m["val_loss_before"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["adapter_size"] == 8
    assert cfg["base_model_name_or_path"] == str(base_dir.resolve())
    assert not (out / "model.safetensors").exists()  # a small directory beside the base, not a copy of it
    assert (base_dir / "model.safetensors").read_bytes() == before
    lm = lmforge.load(out)  # the base it names, plus the adapter
    assert A.adapter_names(lm.model) == ["default"]
    x = torch.randint(0, 300, (1, 8))
    base = lmforge.load(base_dir).model.eval()
    assert (lm.model(x) - base(x)).abs().max() > 1e-4
    answers = json.loads((out / "test_responses.json").read_text())
    again = lm.generate([lmforge.finetune.data.sft_prompt(a) for a in answers], max_new_tokens=4, temperature=0.0)
    assert [str(t).strip() for t in again] == [a["model_response"] for a in answers]  # loaded = trained model
    capsys.readouterr()
    assert main(["finetune", "sft", str(base_dir), "--data", str(alpaca), "--out", str(tmp_path / "x"),
                 "--adapter", "bottleneck", "--lora-r", "4"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["finetune", "sft", str(base_dir), "--data", str(alpaca), "--out", str(tmp_path / "x"),
                 "--adapter", "bottleneck", "--merge"]) == 1
    assert "cannot be merged" in capsys.readouterr().err
    assert main(["finetune", "sft", str(base_dir), "--data", str(alpaca), "--out", str(tmp_path / "x"),
                 "--adapter", "houlsby"]) == 1
    assert "adapter must be bottleneck" in capsys.readouterr().err
