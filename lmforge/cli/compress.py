"""`lmforge quantize | distill | prune`: make a model smaller and check what it cost.

    lmforge quantize runs/demo --scheme int8 --out runs/demo-int8
    lmforge quantize runs/demo --scheme int4 --group-size 32 --method gptq --out runs/demo-int4   # embedded corpus
    lmforge quantize runs/demo --scheme nf4 --group-size 64 --calib-data notes.txt --out runs/demo-nf4
    lmforge distill --teacher runs/demo --student llama-tiny --n-layer 2 --max-steps 200 --out runs/student
    lmforge prune runs/demo --n-layer 3 --intermediate-size 256 --heal-steps 100 --out runs/demo-pruned
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.utils import check_output


def register(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser("quantize", help="weight-only int8 / int4 / nf4 quantization (RTN or GPTQ)",
                              description="Quantize a model's linear layers and write a quantized model directory.")
    q.add_argument("model", help="model directory, .gguf, llama2.c .bin or Hub id")
    q.add_argument("--scheme", choices=["int8", "int4", "nf4"], default="int8", help="number format (default int8)")
    q.add_argument("--group-size", type=int, default=32, help="weights per scale for int4/nf4 (32, 64, 128)")
    q.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="rtn: round to nearest; gptq: error-compensating, needs calibration text")
    q.add_argument("--calib-data", type=Path, default=None,
                   help="UTF-8 text for GPTQ calibration (default: the embedded corpus)")
    q.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    q.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    q.add_argument("--embeddings", choices=["keep", "int8", "same"], default="int8",
                   help="token embedding / LM head: keep float, int8 (default), or the same scheme")
    q.add_argument("--fallback", choices=["int8"], default=None,
                   help="quantize layers whose width the group size does not divide as int8 (default: error)")
    q.add_argument("--out", required=True, type=Path, help="output model directory")
    _overwrite_arg(q)
    q.set_defaults(func=cmd_quantize)

    from lmforge import argconf
    from lmforge.compress.distill import DistillConfig

    d = subparsers.add_parser("distill", help="knowledge distillation: KL to a teacher's softened logits + LM loss",
                              description="Train a student model to imitate a teacher (same vocabulary).")
    d.add_argument("--teacher", required=True, help="teacher model (directory, .gguf, llama2.c .bin, Hub id)")
    d.add_argument("--student", required=True,
                   help="student model directory, or a ModelConfig preset (fresh init with the teacher's vocab)")
    d.add_argument("--n-layer", type=int, default=None, help="preset student: layers")
    d.add_argument("--n-embd", type=int, default=None, help="preset student: width")
    d.add_argument("--data", nargs="*", default=["builtin"], help="text files or 'builtin' (the embedded corpus)")
    d.add_argument("--block-size", type=int, default=128, help="tokens per training window")
    d.add_argument("--out", required=True, type=Path, help="output model directory for the student")
    _overwrite_arg(d)
    argconf.add_arguments(d, DistillConfig)
    d.set_defaults(func=cmd_distill)

    p = subparsers.add_parser("prune", help="structured pruning (heads / MLP channels / layers) + distillation heal",
                              description="Prune a model by activation importance, then heal it by distillation.")
    p.add_argument("model", help="model directory, .gguf, llama2.c .bin or Hub id")
    p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads to keep (heads for MHA models)")
    p.add_argument("--intermediate-size", type=int, default=None, help="MLP channels to keep")
    p.add_argument("--n-layer", type=int, default=None, help="layers to keep")
    p.add_argument("--data", nargs="*", default=["builtin"], help="text for calibration and healing")
    p.add_argument("--block-size", type=int, default=128, help="tokens per window")
    p.add_argument("--heal-steps", type=int, default=100, help="distillation steps after pruning (0: none)")
    p.add_argument("--lr", type=float, default=1e-3, help="healing learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="healing batch size")
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument("--progress", default=None, nargs="?", const="true", metavar="BOOL",
                   help="show a progress bar while healing (default: true)")
    _overwrite_arg(p)
    p.set_defaults(func=cmd_prune)


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it already holds a model (which is replaced)")


def cmd_quantize(args: argparse.Namespace) -> int:
    import lmforge
    from lmforge.compress.quantize import calibration_batches, model_nbytes, quantize_model
    from lmforge.utils import human_bytes

    check_output(args.out, overwrite=args.overwrite)
    lm = lmforge.load(args.model, dtype="float32")
    calib = None
    if args.method == "gptq":
        if lm.tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer; GPTQ needs one to encode calibration text")
        if args.calib_data is not None:
            from lmforge.tokenizers.bpe import read_text_file

            text = read_text_file(args.calib_data)
        else:
            from lmforge.training.data import builtin_corpus

            text = builtin_corpus()
        seq_len = min(args.calib_len, lm.config.block_size)
        calib = calibration_batches(lm.tokenizer, text, args.calib_samples, seq_len)
        calib = list(calib.split(8))  # batches of 8 sequences
    before = model_nbytes(lm.model)
    quantize_model(lm.model, args.scheme, args.group_size, calibration=calib, method=args.method,
                   embeddings=args.embeddings, fallback=args.fallback)
    after = model_nbytes(lm.model)
    lm.save(args.out)
    disk = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(json.dumps({"out": str(args.out), "scheme": args.scheme, "method": args.method,
                      "group_size": None if args.scheme == "int8" else args.group_size,
                      "weights_before": human_bytes(before), "weights_after": human_bytes(after),
                      "ratio": round(after / before, 4), "safetensors_on_disk": human_bytes(disk)}), file=sys.stdout)
    return 0


def _token_data(lm, sources: list[str], block_size: int, batch_size: int, seed: int = 0):
    """Encode the text with the model's tokenizer: (training batches, validation tokens) (last 10% held out)."""
    import numpy as np

    from lmforge.training.data import PackedBatches, builtin_corpus
    from lmforge.tokenizers.bpe import read_text_file

    if lm.tokenizer is None:
        raise ConfigError("the model has no tokenizer to encode the training text")
    text = "\n\n".join(builtin_corpus() if s == "builtin" else read_text_file(s) for s in sources)
    ids = np.asarray(lm.tokenizer.encode(text), dtype=np.int64)
    cut = int(len(ids) * 0.9)
    block_size = min(block_size, lm.config.block_size)
    return PackedBatches(ids[:cut], batch_size, block_size, seed=seed), ids[cut:], block_size


def cmd_distill(args: argparse.Namespace) -> int:
    import lmforge
    from lmforge import argconf
    from lmforge.models.config import PRESETS, ModelConfig
    from lmforge.compress.distill import DistillConfig, distill
    from lmforge.lm import LM
    from lmforge.models.decoder import Transformer

    check_output(args.out, overwrite=args.overwrite)
    teacher = lmforge.load(args.teacher, dtype="float32")
    if args.student in PRESETS:
        over = {k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd)) if v is not None}
        cfg = ModelConfig.from_name(args.student, vocab_size=teacher.config.vocab_size,
                                    block_size=teacher.config.block_size, **over)
        student = LM(Transformer(cfg), teacher.tokenizer, cfg, teacher.generation_config, teacher.chat_template)
    else:
        student = lmforge.load(args.student, dtype="float32")
    values = {k: v for k, v in vars(args).items() if v is not None}
    config = argconf.build(DistillConfig, {k: v for k, v in values.items()
                                           if k in DistillConfig.__dataclass_fields__})
    batches, val, block = _token_data(teacher, args.data, args.block_size, config.batch_size, config.seed)
    result = distill(teacher, student, batches, config, val_tokens=val[: 64 * block])
    student.save(args.out)
    print(json.dumps({"out": str(args.out), "steps": result.train.step,
                      **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.report.items()}}))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    import lmforge
    from lmforge.compress.distill import DistillConfig
    from lmforge.compress.prune import prune_and_heal

    check_output(args.out, overwrite=args.overwrite)
    lm = lmforge.load(args.model, dtype="float32")
    batches, val, block = _token_data(lm, args.data, args.block_size, args.batch_size)
    calib = torch.cat([batches(i)["input_ids"] for i in range(4)])  # (4 * batch_size, T)
    from lmforge import argconf

    heal = argconf.build(DistillConfig, {"max_steps": max(args.heal_steps, 1), "lr": args.lr,
                                         "batch_size": args.batch_size, "warmup_steps": min(10, args.heal_steps),
                                         "eval_every": 0, **({"progress": args.progress} if args.progress else {})})
    targets = {k: v for k, v in (("n_kv_head", args.n_kv_head), ("intermediate_size", args.intermediate_size),
                                 ("n_layer", args.n_layer)) if v is not None}
    if not targets:
        raise ConfigError("say what to prune: --n-kv-head, --intermediate-size and/or --n-layer")
    if args.heal_steps == 0:
        from lmforge.training.eval import perplexity
        from lmforge.lm import LM
        from lmforge.compress.prune import prune_model

        small = prune_model(lm.model, calib, **targets)
        out = LM(small, lm.tokenizer, small.config, lm.generation_config, lm.chat_template)
        report = {"params_before": lm.model.num_params(), "params_after": small.num_params(),
                  "ppl_before": perplexity(lm.model, val[: 64 * block], block)["perplexity"],
                  "ppl_pruned": perplexity(small, val[: 64 * block], block)["perplexity"]}
    else:
        out, report = prune_and_heal(lm, calib, batches, heal, val_tokens=val[: 64 * block], **targets)
    out.save(args.out)
    print(json.dumps({"out": str(args.out), **{k: round(v, 3) if isinstance(v, float) else v
                                               for k, v in report.items()}}))
    return 0
