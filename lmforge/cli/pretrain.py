"""`lmforge pretrain` and `lmforge eval perplexity`.

    lmforge pretrain --config configs/pretrain/demo.yaml --out runs/demo --max-steps 300
    lmforge pretrain --config configs/pretrain/demo.yaml --out runs/demo --max-steps 600 --resume
    torchrun --standalone --nproc_per_node=2 -m lmforge pretrain --config configs/pretrain/demo.yaml --out runs/ddp
    lmforge eval perplexity runs/demo --data notes.txt --ngram 5 [--stride 64]

Every field of `PretrainConfig` is a flag (`--block-size 128`), a YAML key (`block_size: 128`) and a Python
argument. A field that does not exist is an error naming it and the closest real one.
"""

from __future__ import annotations

import argparse
import json

from lmforge import argconf


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.recipes.pretrain import PretrainConfig

    p = subparsers.add_parser("pretrain", help="pretrain a language model from text",
                              description="Train a tokenizer (or load one), tokenize the data into shards and "
                                          "pretrain a model; the output is an lmforge model directory.")
    p.add_argument("--config", "-c", help="YAML file of PretrainConfig fields (e.g. configs/pretrain/demo.yaml)")
    p.add_argument("--out", "-o", dest="out", help="output model directory")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    argconf.add_arguments(p, PretrainConfig, skip=("out", "resume"))
    p.set_defaults(func=cmd_pretrain)

    e = subparsers.add_parser("eval", help="evaluate a model (perplexity with an n-gram baseline)")
    esub = e.add_subparsers(dest="eval_command", metavar="WHAT")
    pp = esub.add_parser("perplexity", help="perplexity of a model on a text file, next to an n-gram baseline",
                         description="Tokenize FILE with the model's tokenizer; the last --val-fraction of the "
                                     "tokens is scored by the model and by an n-gram model fitted on the rest.")
    pp.add_argument("model", help="model directory (or anything lmforge.load reads)")
    pp.add_argument("--data", required=True, help="a text file (or JSONL with a 'text' field)")
    pp.add_argument("--val-fraction", type=float, default=0.1, help="last fraction scored (default 0.1)")
    pp.add_argument("--ngram", type=int, default=5, help="n of the n-gram baseline (0: none; default 5)")
    pp.add_argument("--smoothing", default="kneser_ney", help="kneser_ney (default) or add_k")
    pp.add_argument("--block-size", type=int, help="context per window (default: the model's)")
    pp.add_argument("--stride", type=int, default=None,
                    help="sliding windows: a new window every N tokens, so each token keeps at least block-size - N "
                         "tokens of context (default: block size, non-overlapping windows)")
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--device", default=None, help="cpu (default), auto, cuda")
    pp.add_argument("--json", action="store_true", help="print the results as JSON")
    pp.set_defaults(func=cmd_eval_perplexity)
    e.set_defaults(func=lambda args: (e.print_help(), 2)[1])


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.recipes.pretrain import PretrainConfig, run_pretrain

    cfg = argconf.from_cli(PretrainConfig, args, args.config, out=args.out, resume=args.resume)
    run_pretrain(cfg)
    return 0


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from lmforge.loader import load
    from lmforge.training.data import read_documents, train_val_split
    from lmforge.training.eval import ngram_baseline, per_char, perplexity
    from lmforge.errors import DataError

    lm = load(args.model, device=args.device)
    tok = lm.tokenizer
    texts = [t for t, _ in read_documents([args.data])]
    ids: list[int] = []
    eos = getattr(tok, "eos_token_id", None)
    for i, t in enumerate(texts):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tok.encode(t, allowed_special=set(), disallowed_special=()))
    if len(ids) < 4:
        raise DataError(f"{args.data}: too little text to evaluate ({len(ids)} tokens)")
    train_ids, val_ids = train_val_split(ids, args.val_fraction)
    val = val_ids.numpy()
    n_chars = len(tok.decode(val[1:].tolist()))
    block = min(args.block_size or lm.config.block_size, lm.config.block_size)
    stride = args.stride or block
    res = perplexity(lm.model, val, block, args.batch_size, progress=True, stride=stride)
    rows = [("model", per_char({**res, "window": block, "stride": stride}, n_chars))]
    if args.ngram:
        if len(train_ids) < 2:
            raise DataError(f"{args.data}: no tokens left to fit the n-gram baseline")
        base = ngram_baseline(train_ids, val, n=args.ngram, vocab_size=lm.config.vocab_size,
                              smoothing=args.smoothing)
        rows.append((f"{args.ngram}-gram ({args.smoothing}, fitted on the first {len(train_ids):,} tokens)",
                     per_char(base, n_chars)))
    if args.json:
        print(json.dumps({name: r for name, r in rows}, indent=2))
        return 0
    print(f"{len(val):,} validation tokens ({n_chars:,} characters) of {args.data}; the model scores them in "
          f"windows of {block} tokens" + (f" starting every {stride} (each token sees >= {block - stride} tokens of "
                                          f"context)" if stride < block else " (non-overlapping)"))
    print(f"{'':60s} {'loss/token':>10s} {'perplexity':>11s} {'bits/char':>10s}")
    for name, r in rows:
        print(f"{name:60s} {r['loss']:10.4f} {r['perplexity']:11.2f} {r['bits_per_char']:10.4f}")
    return 0
