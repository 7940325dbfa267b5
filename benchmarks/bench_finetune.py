"""Fine-tuning benchmarks: SMS spam accuracy, SFT loss + ROUGE-L, DPO preference accuracy, LoRA speed vs PEFT.

    .venv/bin/python benchmarks/bench_finetune.py                       # every stage
    .venv/bin/python benchmarks/bench_finetune.py --stages pretrain,sms  # some stages

Stages (each reuses the previous stage's output directory under --work):
  pretrain   a Llama-style model pretrained by lmforge on the embedded corpus (the TRAIN recipe; no downloads)
  sms        classify the SMS Spam Collection, fixed seeded 70/10/20 split; target test accuracy >= 96% in < 10 min
  sft        instruction fine-tuning on instruction-data.json (85/5/10): held-out loss and ROUGE-L before/after
  dpo        DPO (LoRA, reference = adapters off) from the SFT model on the preference set: held-out preference
             accuracy before/after (target >= 80%)
  lora-speed LoRA training steps/s, lmforge vs transformers+peft on the same exported model, same batch (ratio)

Shared data comes from `lmforge.utils.shared_data_dir()` (../shared/data). Results are printed as JSON lines
and appended to <work>/results.jsonl; benchmarks/results/finetune.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import shared_data_dir  # noqa: E402


def emit(work: Path, rec: dict) -> None:
    rec = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **rec}
    print(json.dumps(rec), flush=True)
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def stage_pretrain(work: Path, args) -> None:
    from lmforge.recipes.pretrain import PretrainConfig, run_pretrain

    out = work / "base"
    if (out / "model.safetensors").exists():
        print(f"pretrain: reusing {out}")
        return
    cfg = PretrainConfig(data=["builtin"], tokenizer="train", vocab_size=2048, model="llama-tiny", block_size=256,
                         n_embd=128, batch_size=8, max_steps=args.pretrain_steps, lr=3e-3, warmup_steps=30,
                         min_lr_ratio=0.1, eval_every=100, eval_batches=10, save_every=100, seed=1337, out=str(out),
                         progress=not args.quiet, device="cpu")
    t = time.time()
    run_pretrain(cfg)
    emit(work, {"stage": "pretrain", "steps": cfg.max_steps, "seconds": round(time.time() - t, 1)})


def stage_sms(work: Path, args) -> None:
    from lmforge.recipes.classify import ClassifyConfig, run_classify

    data = shared_data_dir() / "sms_spam_collection" / "SMSSpamCollection"
    for name, undersample in (("full", False), ("balanced", True)):
        if args.sms_variant not in ("both", name):
            continue
        epochs = args.sms_epochs if name == "full" else args.sms_balanced_epochs
        out = work / f"sms-{name}"
        cfg = ClassifyConfig(model=str(work / "base"), data=str(data), out=str(out), split=[0.7, 0.1, 0.2],
                             split_seed=123, undersample=undersample, train_layers=-1, epochs=epochs,
                             lr=args.sms_lr, schedule="cosine", warmup_steps=20, batch_size=16, max_length=128,
                             eval_every=0, weight_decay=0.1, progress=not args.quiet, device="cpu",
                             seed=1)
        t = time.time()
        res = run_classify(cfg)
        secs = time.time() - t
        emit(work, {"stage": "sms", "variant": name, "test_accuracy": res["test"]["accuracy"],
                    "val_accuracy": res["val"]["accuracy"], "train_accuracy": res["train"]["accuracy"],
                    "test_spam_f1": res["test"]["per_class"]["spam"]["f1"],
                    "test_spam_precision": res["test"]["per_class"]["spam"]["precision"],
                    "test_spam_recall": res["test"]["per_class"]["spam"]["recall"],
                    "test_n": res["test"]["n"], "seconds": round(secs, 1), "epochs": epochs,
                    "course_gpt2_124m_test_accuracy": "95.67% (balanced set, last block + head)"})


def stage_sft(work: Path, args) -> None:
    from lmforge.recipes.sft import SFTConfig, run_sft

    cfg = SFTConfig(model=str(work / "base"), data=str(shared_data_dir() / "instruction-data.json"),
                    out=str(work / "sft"), epochs=args.sft_epochs, lr=1e-3, schedule="cosine", warmup_steps=20,
                    batch_size=8, max_length=256, eval_every=100, eval_batches=0, max_new_tokens=64,
                    eval_generate=args.eval_generate, rouge_before=True, progress=not args.quiet, device="cpu",
                    seed=1)
    t = time.time()
    m = run_sft(cfg)
    emit(work, {"stage": "sft", **m, "seconds": round(time.time() - t, 1), "epochs": args.sft_epochs})


def stage_dpo(work: Path, args) -> None:
    from lmforge.recipes.dpo import DPOConfig, run_dpo

    cfg = DPOConfig(model=str(work / "sft"), data=str(shared_data_dir() / "instruction-data-with-preference.json"),
                    out=str(work / "dpo"), epochs=args.dpo_epochs, lr=args.dpo_lr, beta=0.1, lora_r=16,
                    lora_alpha=32, lora_dropout=0.0, lora_targets=["all-linear"], precompute_ref=True, batch_size=8, max_length=256,
                    eval_every=0, schedule="cosine", warmup_steps=10, progress=not args.quiet, device="cpu", seed=1)
    t = time.time()
    m = run_dpo(cfg)
    emit(work, {"stage": "dpo", "before": m["before"], "after": m["after"], "seconds": round(time.time() - t, 1),
                "epochs": args.dpo_epochs})


def stage_lora_speed(work: Path, args) -> None:
    """LoRA (r=8, q/v) training steps on the same model in lmforge and in transformers+peft."""
    import peft
    import transformers

    import lmforge
    from lmforge.finetune import lora
    from lmforge.formats.hf import export_hf
    from lmforge.models.config import ModelConfig
    from lmforge.lm import LM
    from lmforge.models.decoder import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2", n_layer=6, n_embd=384, n_head=6, vocab_size=8192, block_size=256)
    hf_dir = work / "lora-speed-hf"
    export_hf(LM(Transformer(cfg), None, cfg), hf_dir)
    x = torch.randint(0, cfg.vocab_size, (8, 256))

    def bench(model, fwd) -> float:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for i in range(args.speed_steps + 2):
            t = time.perf_counter()
            logits = fwd(model, x)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        times = sorted(times[2:])
        return times[len(times) // 2]  # median step time

    ours = lmforge.load(hf_dir).model.train()
    lora.add_lora(ours, ["q_proj", "v_proj"], r=8, alpha=16)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf_dir),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
                                                 fan_in_fan_out=True)).train()
    t_theirs = bench(theirs, lambda m, ids: m(input_ids=ids).logits)
    t_ours = bench(ours, lambda m, ids: m(ids))
    emit(work, {"stage": "lora-speed", "model": "GPT-2 shape 6x384, vocab 8192, 8x256 tokens, LoRA r=8 on q,v "
                                                "(lmforge) / c_attn (peft)",
                "lmforge_step_s": round(t_ours, 4), "peft_step_s": round(t_theirs, 4),
                "speedup": round(t_theirs / t_ours, 3), "lmforge_trainable": lora.count_params(ours)[0],
                "peft_trainable": theirs.get_nb_trainable_parameters()[0]})


STAGES = {"pretrain": stage_pretrain, "sms": stage_sms, "sft": stage_sft, "dpo": stage_dpo,
          "lora-speed": stage_lora_speed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--work", default="/tmp/lmforge-bench-finetune")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a loaded box)")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--sms-epochs", type=float, default=2)
    p.add_argument("--sms-balanced-epochs", type=float, default=8)
    p.add_argument("--sms-lr", type=float, default=5e-4)
    p.add_argument("--sms-variant", default="both", choices=["both", "full", "balanced"])
    p.add_argument("--sft-epochs", type=float, default=2)
    p.add_argument("--eval-generate", type=int, default=110, help="test records answered for ROUGE-L")
    p.add_argument("--dpo-epochs", type=float, default=2)
    p.add_argument("--dpo-lr", type=float, default=5e-4)
    p.add_argument("--speed-steps", type=int, default=8)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}, torch threads {args.threads}")
    for name in args.stages.split(","):
        STAGES[name](work, args)


if __name__ == "__main__":
    main()
