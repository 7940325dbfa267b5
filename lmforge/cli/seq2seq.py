"""Encoder-decoder verbs: `lmforge seq2seq pretrain | finetune | eval | generate`.

    lmforge seq2seq pretrain --config configs/seq2seq/pretrain-demo.yaml --out runs/t5-demo
    lmforge seq2seq finetune --config configs/seq2seq/dates.yaml --model runs/t5-demo --out runs/t5-dates
    lmforge seq2seq eval runs/t5-dates --data dates --num-beams 4
    lmforge seq2seq generate runs/t5-dates "to iso: March 14, 2021" --num-beams 4 --num-return-sequences 2

One verb with sub-verbs, so that T5's settings (span corruption, sentinels, beams) stay out of the decoder verbs'
`--help`; each sub-verb is one recipe in `lmforge.recipes.seq2seq` with its config dataclass.
"""

from __future__ import annotations

import argparse
import json

from lmforge import argconf


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.recipes.seq2seq import Seq2SeqFinetuneConfig, Seq2SeqPretrainConfig

    top = subparsers.add_parser("seq2seq", help="encoder-decoder (T5): pretrain, fine-tune, evaluate, generate",
                                description="T5 recipes: span-corruption pretraining, (input -> target) "
                                            "fine-tuning with optional LoRA, exact-match evaluation, generation.")
    sub = top.add_subparsers(dest="seq2seq_cmd", metavar="{pretrain,finetune,eval,generate}")
    sub.required = True
    p = sub.add_parser("pretrain", help="train a tokenizer and a small T5 with span corruption")
    p.add_argument("--config", "-c", help="YAML file of config fields (e.g. configs/seq2seq/pretrain-demo.yaml)")
    argconf.add_arguments(p, Seq2SeqPretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    f = sub.add_parser("finetune", help="fine-tune a T5 on input -> target pairs (full or --lora)")
    f.add_argument("--config", "-c", help="YAML file of config fields (e.g. configs/seq2seq/dates.yaml)")
    argconf.add_arguments(f, Seq2SeqFinetuneConfig)
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser("eval", help="exact match of a T5 directory on a task")
    e.add_argument("model", metavar="MODEL", help="T5 directory")
    e.add_argument("--data", default="dates", help="'dates' or a .jsonl of {input, target} (default: dates)")
    e.add_argument("--n", type=int, default=200, help="examples to generate for dates (default 200)")
    e.add_argument("--seed", type=int, default=99, help="seed of the generated examples (default 99)")
    e.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    e.add_argument("--max-new-tokens", type=int, default=24, help="longest answer (default 24)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate from a T5 directory")
    g.add_argument("model", metavar="MODEL", help="T5 directory")
    g.add_argument("texts", nargs="+", metavar="TEXT", help="input text(s)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1)")
    g.add_argument("--num-return-sequences", type=int, default=1, help="hypotheses per input (<= beams)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length ** this (default 1)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating n-grams of this size")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0 samples (num_beams 1, or "
                   "with --do-sample)")
    g.add_argument("--do-sample", action="store_true", help="with --num-beams > 1: beam sampling (needs "
                   "--temperature > 0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.set_defaults(func=cmd_generate)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.recipes.seq2seq import Seq2SeqPretrainConfig, run_pretrain

    run_pretrain(argconf.from_cli(Seq2SeqPretrainConfig, args, args.config))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.recipes.seq2seq import Seq2SeqFinetuneConfig, run_finetune

    summary = run_finetune(argconf.from_cli(Seq2SeqFinetuneConfig, args, args.config))
    print(json.dumps({k: v for k, v in summary.items() if k != "examples"}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.recipes.seq2seq import run_eval

    print(json.dumps(run_eval(args.model, args.data, args.n, args.seed, args.num_beams, args.max_new_tokens)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.loader import load

    lm = load(args.model)
    controls = dict(num_beams=args.num_beams, num_return_sequences=args.num_return_sequences,
                    length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, do_sample=args.do_sample)
    if not getattr(lm, "is_encoder_decoder", False):
        from lmforge.errors import ConfigError

        raise ConfigError(f"{args.model} is not an encoder-decoder (T5); use `lmforge generate` for decoders")
    for out in lm.generate(list(args.texts), **controls):
        print(json.dumps([str(o) for o in out] if isinstance(out, list) else str(out)))
    return 0
