"""Structured pruning: keeping everything is the identity, pruned models are smaller valid models that load
back, importance picks the heads that matter, and the heal lowers perplexity."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.models.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.lm import LM
from lmforge.models.decoder import Transformer
from lmforge.compress.prune import importance_scores, prune_model
from lmforge.recipes.compress import prune_and_heal


def model_of(preset, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=128, n_layer=3, n_embd=64, n_head=4, block_size=64)
    if preset == "llama-tiny":
        base.update(n_kv_head=2, intermediate_size=128)
    return Transformer(ModelConfig.from_name(preset, **{**base, **kw})).eval()


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-tiny"])
def test_keep_all_is_identity_and_pruned_is_valid(preset, tmp_path):
    m = model_of(preset)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(prune_model(m, ids)(ids), m(ids))
    small = prune_model(m, ids, n_kv_head=1, intermediate_size=48, n_layer=2)
    c = small.config
    assert (c.n_layer, c.n_kv_head, c.intermediate_size, c.head_dim) == (2, 1, 48, 16)
    assert c.n_head == (2 if preset == "llama-tiny" else 1)
    assert small.num_params() < 0.6 * m.num_params()
    LM(small, None, c).save(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(lmforge.load(tmp_path / "p").model(ids), small(ids))


def test_importance_finds_the_dead_head_and_channel():
    m = model_of("gpt-tiny", n_layer=1)
    with torch.no_grad():  # silence head 2 of layer 0 and MLP channel 5: their activations are exactly zero
        m.blocks[0].attn.v_proj.weight[32:48] = 0
        m.blocks[0].attn.v_proj.bias[32:48] = 0
        m.blocks[0].mlp.up_proj.weight[5] = 0
        m.blocks[0].mlp.up_proj.bias[5] = -10.0  # gelu(-10) ~ 0
    s = importance_scores(m, torch.randint(0, 128, (4, 16)))
    assert s["heads"][0].argmin() == 2 and s["mlp"][0].argmin() == 5
    small = prune_model(m, None, n_kv_head=3, scores=s)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():  # removing a head that contributed nothing changes nothing
        torch.testing.assert_close(small(ids), m(ids), rtol=1e-5, atol=1e-5)


def test_heal_lowers_perplexity():
    m = model_of("llama-tiny")
    torch.manual_seed(1)
    # a learnable sequence: the teacher is trained a little on it first, so pruning has something to lose
    seq = torch.arange(0, 64).repeat(20) % 50
    batches = [{"input_ids": seq[i:i + 32][None], "labels": seq[i + 1:i + 33][None]} for i in range(0, 600, 7)]
    from lmforge.training.loop import TrainConfig, train

    train(m, batches, TrainConfig(max_steps=40, lr=3e-3, device="cpu", progress=False, eval_every=0))
    lm = LM(m.eval(), None, m.config)
    from lmforge.compress.distill import DistillConfig

    out, rep = prune_and_heal(lm, seq[:256].view(8, 32), batches,
                              DistillConfig(max_steps=30, lr=3e-3, device="cpu", progress=False, eval_every=0),
                              val_tokens=seq[:400], n_layer=2, intermediate_size=64)
    assert rep["params_after"] < rep["params_before"]
    assert rep["ppl_healed"] < rep["ppl_pruned"]
    assert out.config.n_layer == 2


def test_bad_targets():
    m = model_of("llama-tiny")
    with pytest.raises(ConfigError, match=r"n_layer=5 must be between 1 and the model's 3"):
        prune_model(m, torch.zeros(1, 4, dtype=torch.long), n_layer=5)
    with pytest.raises(ConfigError, match="intermediate_size=0"):
        prune_model(m, torch.zeros(1, 4, dtype=torch.long), intermediate_size=0)
