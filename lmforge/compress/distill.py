"""Knowledge distillation: train a small student to imitate a large teacher's whole output distribution.

Why it works (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"): the training text
says only which token came next; the teacher says how plausible *every* token was. Its probabilities for the
wrong-but-reasonable tokens ("dark knowledge": after "the cat sat on the", "mat" 0.4 but also "sofa" 0.1, "floor"
0.1 and "banana" 1e-6) carry far more information per example than a one-hot target, so a student learns faster
and generalizes better from the same data.

The loss, per position, with temperature T and weight alpha:

    L = alpha * T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) )  +  (1 - alpha) * CE(z_student, next token)

- T > 1 flattens both distributions, so the small probabilities (where the dark knowledge lives) weigh in the KL
  instead of being swamped by the top token.
- Gradients of the softened KL scale like 1/T^2; multiplying by T^2 keeps the two terms balanced whatever T is.
- The LM (cross-entropy) term keeps the student anchored to the real data where the teacher is wrong.

Teacher and student must share the vocabulary (the KL compares distributions over the same token ids). The
training itself is `lmforge.training.loop.train`, the project's one loop, called with this loss function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.training.batch import split_batch
from lmforge.training.eval import perplexity
from lmforge.training.loop import train, TrainConfig, TrainResult
from lmforge.utils import check_seed


def _module(m) -> nn.Module:
    return m.model if hasattr(m, "model") and isinstance(m.model, nn.Module) else m


def check_vocab(teacher: nn.Module, student: nn.Module, teacher_tok=None, student_tok=None) -> None:
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise ConfigError(f"teacher vocab_size {tv} != student vocab_size {sv}: distillation needs one shared "
                          "vocabulary")
    if teacher_tok is not None and student_tok is not None and teacher_tok.vocab != student_tok.vocab:
        raise ConfigError("teacher and student tokenizers differ: distillation needs one shared vocabulary")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE. logits (B, T, V), targets (B, T) (-100 = skip)."""
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float()  # (N, V)
    t = teacher_logits.reshape(-1, V).float()  # (N, V)
    y = targets.reshape(-1)  # (N,)
    keep = y != -100
    s_log = F.log_softmax(s[keep] / temperature, dim=-1)
    t_log = F.log_softmax(t[keep] / temperature, dim=-1)
    kl = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * temperature**2
    if alpha >= 1.0:
        return kl
    ce = F.cross_entropy(s, y, ignore_index=-100)
    return alpha * kl + (1 - alpha) * ce


@dataclass
class DistillConfig(TrainConfig):
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the KL term (> 0)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the KL term; 1 - alpha weighs the LM loss"})

    def __post_init__(self):
        super().__post_init__()

        check_seed(self.seed)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class DistillResult:
    train: TrainResult
    report: dict[str, Any]  # teacher / student perplexity before and after (when val tokens were given)


def distill(teacher, student, data: Any, config: DistillConfig | None = None, *, val_tokens=None,
            out_dir=None, save_model=None, log=None) -> DistillResult:
    """Train `student` (in place) to match `teacher` on `data` with the distillation loss.

    teacher, student: `Transformer`s or `LM`s with the same vocabulary (the teacher stays frozen)
    data:       batches for `lmforge.training.loop.train` ({"input_ids", "labels"} dicts or (inputs, targets) pairs)
    val_tokens: a 1-D token sequence for the perplexity report (teacher, student before, student after)
    """
    config = config or DistillConfig()
    t_model, s_model = _module(teacher), _module(student)
    check_vocab(t_model, s_model, getattr(teacher, "tokenizer", None), getattr(student, "tokenizer", None))
    t_model.eval()
    for p in t_model.parameters():
        p.requires_grad_(False)
    report: dict[str, Any] = {"teacher_params": sum(p.numel() for p in {id(p): p for p in t_model.parameters()}.values()),
                              "student_params": sum(p.numel() for p in {id(p): p for p in s_model.parameters()}.values())}
    block = min(t_model.config.block_size, s_model.config.block_size)
    if val_tokens is not None:
        report["teacher_ppl"] = perplexity(t_model, val_tokens, block)["perplexity"]
        report["student_ppl_before"] = perplexity(s_model, val_tokens, block)["perplexity"]

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = split_batch(batch)
        with torch.no_grad():
            t_model.to(inputs.device)
            t_logits = t_model(inputs)  # (B, T, V)
        return distillation_loss(model(inputs), t_logits, targets, config.temperature, config.alpha)

    result = train(s_model, data, config, loss_fn=loss_fn, out_dir=out_dir, save_model=save_model, log=log)
    if val_tokens is not None:
        report["student_ppl_after"] = perplexity(s_model, val_tokens, block)["perplexity"]
    return DistillResult(result, report)
