"""`lmforge quantize | distill | prune`: make a model smaller and check what it cost.

    lmforge quantize runs/demo --scheme int8 --out runs/demo-int8
    lmforge quantize runs/demo --scheme int4 --group-size 32 --method gptq --out runs/demo-int4   # embedded corpus
    lmforge quantize runs/demo --scheme nf4 --group-size 64 --calib-data notes.txt --out runs/demo-nf4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError


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
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    import lmforge
    from ..quantize import calibration_batches, model_nbytes, quantize_model
    from ..utils import human_bytes

    lm = lmforge.load(args.model, dtype="float32")
    calib = None
    if args.method == "gptq":
        if lm.tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer; GPTQ needs one to encode calibration text")
        if args.calib_data is not None:
            from ..tokenizer import read_text_file

            text = read_text_file(args.calib_data)
        else:
            from ..data import builtin_corpus

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
