"""`lmforge pipeline TASK MODEL`: run one `lmforge.pipeline` task over text, one JSON line per input.

    lmforge pipeline fill-mask runs/mlm-demo "The [MASK] statement ends a loop."
    lmforge pipeline token-classification runs/ner --input sentences.txt --aggregation-strategy simple
    lmforge pipeline question-answering runs/qa --question "Who wrote it?" --input context.txt
    lmforge pipeline zero-shot-classification runs/nli "I love pasta" --candidate-labels food,sports
    lmforge pipeline sentence-similarity MINILM_DIR "A man eats." --sentences "A man is eating.,The sky is blue."
    lmforge pipeline text2text-generation runs/t5-dates "to iso: March 14, 2021" --num-beams 4

Inputs: the positional TEXT, or --input FILE (one input per line; for question-answering the whole file is the
context). Options that a task does not take are refused by the task with a one-line error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.errors import ConfigError, DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pipeline", help="run a task (fill-mask, ner, QA, summarization...) and print JSON lines",
                              description="Run lmforge.pipeline(TASK, MODEL) over text; one JSON line per input.")
    p.add_argument("task", metavar="TASK", help="text-generation, text2text-generation, summarization, translation, "
                   "text-classification, zero-shot-classification, token-classification, question-answering, "
                   "fill-mask, feature-extraction or sentence-similarity")
    p.add_argument("model", help="model directory (lmforge or Hugging Face), or Hub id")
    p.add_argument("text", nargs="?", help="the input text (or use --input)")
    p.add_argument("--input", type=Path, help="a UTF-8 file: one input per line (QA: the whole file is the context)")
    p.add_argument("--device", default=None, help="cpu (default), auto, cuda, mps")
    p.add_argument("--top-k", type=int, help="fill-mask, text-classification, QA: how many answers")
    p.add_argument("--aggregation-strategy", help="token-classification: none, simple, first, average or max")
    p.add_argument("--question", help="question-answering: the question (the text/--input is the context)")
    p.add_argument("--candidate-labels", help="zero-shot-classification: comma-separated labels")
    p.add_argument("--multi-label", action="store_true", help="zero-shot-classification: labels are independent")
    p.add_argument("--sentences", help="sentence-similarity: comma-separated sentences to compare with the text")
    p.add_argument("--max-new-tokens", type=int, help="generation tasks: most tokens to generate")
    p.add_argument("--num-beams", type=int, help="generation tasks: beam search width")
    p.add_argument("--temperature", type=float, help="generation tasks: 0 = greedy (text2text tasks: with "
                   "--do-sample only, as in transformers)")
    p.add_argument("--do-sample", action="store_true", help="text2text tasks: sample (beam sampling with beams)")
    p.add_argument("--num-return-sequences", type=int, help="generation tasks: outputs per input (<= beams)")
    p.add_argument("--seed", type=int, help="generation tasks: sampling seed")
    p.set_defaults(func=cmd_pipeline)


def _inputs(args: argparse.Namespace) -> list[str]:
    if args.input is not None:
        try:
            text = args.input.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{args.input}: no such file") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{args.input}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise DataError(f"{args.input}: cannot read ({e.strerror})") from None
        if args.task == "question-answering":
            return [text]
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{args.input}: no input lines")
        return lines
    if args.text is None:
        raise ConfigError("give the input text, or --input FILE")
    return [args.text]


def cmd_pipeline(args: argparse.Namespace) -> int:
    from lmforge.pipelines import pipeline  # here, not at the top: `lmforge --help` should not import torch

    inputs = _inputs(args)
    opts = {"top_k": args.top_k, "aggregation_strategy": args.aggregation_strategy,
            "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "temperature": args.temperature,
            "num_return_sequences": args.num_return_sequences, "seed": args.seed}
    opts = {k: v for k, v in opts.items() if v is not None}
    if args.do_sample:
        opts["do_sample"] = True
    if args.candidate_labels:
        opts["candidate_labels"] = [s.strip() for s in args.candidate_labels.split(",") if s.strip()]
        opts["multi_label"] = args.multi_label
    pipe = pipeline(args.task, args.model, device=args.device)
    for item in inputs:
        if args.task == "question-answering":
            if not args.question:
                raise ConfigError("question-answering needs --question")
            out = pipe(question=args.question, context=item, **opts)
        elif args.task == "sentence-similarity":
            sentences = [s.strip() for s in (args.sentences or "").split(",") if s.strip()]
            out = pipe(source_sentence=item, sentences=sentences, **opts)
        else:
            out = pipe(item, **opts)
        print(json.dumps(out, ensure_ascii=False), flush=True)
    return 0

