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
from pathlib import Path



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


def _print(report: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) and k != "ratio" else v for k, v in report.items()}))


def cmd_quantize(args: argparse.Namespace) -> int:
    from lmforge.recipes.compress import run_quantize

    _print(run_quantize(args.model, args.out, scheme=args.scheme, group_size=args.group_size, method=args.method,
                        calib_data=args.calib_data, calib_samples=args.calib_samples, calib_len=args.calib_len,
                        embeddings=args.embeddings, fallback=args.fallback, overwrite=args.overwrite))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from lmforge import argconf
    from lmforge.compress.distill import DistillConfig
    from lmforge.recipes.compress import run_distill

    values = {k: v for k, v in vars(args).items() if v is not None and k in DistillConfig.__dataclass_fields__}
    config = argconf.build(DistillConfig, values)
    _print(run_distill(args.teacher, args.student, args.out, config, data=args.data, block_size=args.block_size,
                       n_layer=args.n_layer, n_embd=args.n_embd, overwrite=args.overwrite))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from lmforge.recipes.compress import run_prune

    _print(run_prune(args.model, args.out, n_kv_head=args.n_kv_head, intermediate_size=args.intermediate_size,
                     n_layer=args.n_layer, data=args.data, block_size=args.block_size, heal_steps=args.heal_steps,
                     lr=args.lr, batch_size=args.batch_size, progress=args.progress, overwrite=args.overwrite))
    return 0
