"""DPO: loss, rewards, margins and accuracy equal TRL's DPOTrainer on the same batch; the paper's formula by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lmforge
from lmforge.finetune import data as ftdata
from lmforge.finetune.losses import dpo_loss, sequence_logprobs, split_pairs

warnings.filterwarnings("ignore")


def test_dpo_formula_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    # pair 0: chosen ratio +0.5, rejected ratio -1.0 -> delta 1.5; pair 1: -1.0 and +1.0 -> delta -2.0
    expected = (-math.log(1 / (1 + math.exp(-beta * 1.5))) - math.log(1 / (1 + math.exp(beta * 2.0)))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])
    assert out.margins.tolist() == pytest.approx([0.75, -1.0])
    assert out.accuracy.item() == 0.5
    same = dpo_loss(pc, pr, pc, pr, beta=beta)  # policy == reference: loss log 2, margins 0
    assert same.loss.item() == pytest.approx(math.log(2))


def test_dpo_equals_trl(tmp_path):
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    trl = pytest.importorskip("trl")

    vocab = {f"w{i}": i for i in range(60)} | {"[UNK]": 60, "[EOS]": 61}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]", pad_token="[EOS]",
                                               unk_token="[UNK]")

    def tiny(seed):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=64, bos_token_id=61, eos_token_id=61))

    policy, ref = tiny(0), tiny(1)
    policy.save_pretrained(tmp_path / "policy")
    ref.save_pretrained(tmp_path / "ref")
    rows = [{"prompt": "w1 w2 w3", "chosen": " w4 w5 w9", "rejected": " w6"},
            {"prompt": "w7 w8", "chosen": " w10", "rejected": " w11 w12 w13 w14"},
            {"prompt": "w20 w21 w22 w23", "chosen": " w24 w25", "rejected": " w26 w27"}]
    beta = 0.3
    cfg = trl.DPOConfig(output_dir=str(tmp_path / "run"), report_to=[], beta=beta, per_device_train_batch_size=3,
                        max_steps=1, use_cpu=True, seed=0, bf16=False)  # fp32 both sides
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    policy.eval()
    trainer.model.eval()
    trl_loss = trainer.compute_loss(trainer.model, batch).item()
    m = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    # lmforge on the same token rows: targets are the completion tokens (shifted by one), everything else -100
    ids, cmask = batch["input_ids"], batch["completion_mask"].bool()
    labels = ids[:, 1:].masked_fill(~cmask[:, 1:], ftdata.IGNORE_INDEX)
    ours = {"input_ids": ids[:, :-1], "labels": labels}
    pol = lmforge.load(tmp_path / "policy").model.eval()
    rm = lmforge.load(tmp_path / "ref").model.eval()
    with torch.no_grad():
        pc, pr = split_pairs(sequence_logprobs(pol, ours))
        rc, rr = split_pairs(sequence_logprobs(rm, ours))
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert out.loss.item() == pytest.approx(trl_loss, abs=1e-6)
    assert out.chosen_rewards.mean().item() == pytest.approx(m["rewards/chosen"], abs=1e-6)
    assert out.rejected_rewards.mean().item() == pytest.approx(m["rewards/rejected"], abs=1e-6)
    assert out.margins.mean().item() == pytest.approx(m["rewards/margins"], abs=1e-6)
    assert out.accuracy.item() == pytest.approx(m["rewards/accuracies"])
    assert pc.mean().item() == pytest.approx(m["logps/chosen"], abs=1e-5)
    assert pr.mean().item() == pytest.approx(m["logps/rejected"], abs=1e-5)
    assert 0 < out.accuracy.item() < 1 and abs(out.margins.mean().item()) > 1e-3  # a batch that discriminates
