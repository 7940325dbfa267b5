"""Distillation: the loss against a hand computation, training through lmforge.training.loop moves the student toward
the teacher, vocabulary mismatch is a one-line error, and the CLI runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.config import ModelConfig
from lmforge.compress.distill import DistillConfig, distill, distillation_loss
from lmforge.errors import ConfigError
from lmforge.models.decoder import Transformer


def tiny(n_layer=2, n_embd=64, vocab=128, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("llama-tiny", vocab_size=vocab, n_layer=n_layer, n_embd=n_embd,
                                             n_head=4, n_kv_head=2, intermediate_size=128, block_size=64))


def test_loss_matches_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 0] = -100
    T, alpha = 3.0, 0.7
    keep = (y != -100).reshape(-1)
    p = F.softmax(t.reshape(-1, 11)[keep] / T, -1)
    q = F.log_softmax(s.reshape(-1, 11)[keep] / T, -1)
    kl = (p * (p.log() - q)).sum(-1).mean() * T**2
    ce = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(distillation_loss(s, t, y, T, alpha), alpha * kl + (1 - alpha) * ce)
    assert distillation_loss(t, t, y, T, 1.0).abs() < 1e-6  # a student equal to its teacher: zero KL


def test_distill_moves_student_toward_teacher():
    teacher, student = tiny(seed=1).eval(), tiny(n_layer=1, n_embd=32, seed=2)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (8, 33))
    batches = [{"input_ids": ids[i:i + 4, :-1], "labels": ids[i:i + 4, 1:]} for i in (0, 4)]

    def kl_to_teacher():
        with torch.no_grad():
            return distillation_loss(student(ids[:, :-1]), teacher(ids[:, :-1]), ids[:, 1:], 1.0, 1.0).item()

    before = kl_to_teacher()
    t_before = [p.clone() for p in teacher.parameters()]
    res = distill(teacher, student, batches, DistillConfig(max_steps=30, lr=3e-3, alpha=1.0, temperature=1.0,
                                                           device="cpu", progress=False, eval_every=0),
                  val_tokens=ids.reshape(-1))
    assert kl_to_teacher() < 0.7 * before
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))  # teacher frozen
    r = res.report
    assert r["student_params"] < r["teacher_params"] and res.train.step == 30
    assert {"teacher_ppl", "student_ppl_before", "student_ppl_after"} <= set(r)
    # random teacher on random tokens: the student's perplexity moves toward the teacher's
    assert abs(r["student_ppl_after"] - r["teacher_ppl"]) < abs(r["student_ppl_before"] - r["teacher_ppl"])


def test_vocab_mismatch_and_bad_config():
    with pytest.raises(ConfigError, match="teacher vocab_size 128 != student vocab_size 96"):
        distill(tiny(), tiny(vocab=96), [], DistillConfig(max_steps=1))
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        DistillConfig(alpha=1.5)


def test_cli_distill(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.lm import LM
    from lmforge.tokenizers.bpe import Tokenizer

    text = "the cat sat on the mat. the dog sat on the log. " * 60
    tok = Tokenizer.train([text], vocab_size=256 + 16)
    cfg = ModelConfig.from_name("llama-tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2,
                                n_kv_head=1, intermediate_size=64, block_size=32)
    LM(Transformer(cfg), tok, cfg).save(tmp_path / "teacher")
    (tmp_path / "data.txt").write_text(text)
    rc = main(["distill", "--teacher", str(tmp_path / "teacher"), "--student", "llama-tiny", "--n-layer", "1",
               "--n-embd", "16", "--data", str(tmp_path / "data.txt"), "--block-size", "16", "--max-steps", "3",
               "--batch-size", "2", "--eval-every", "0", "--progress", "false", "--device", "cpu",
               "--out", str(tmp_path / "student")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 3 and "teacher_ppl" in report and "student_ppl_after" in report
    assert (tmp_path / "student" / "model.safetensors").exists()
