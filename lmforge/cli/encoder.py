"""Encoder task verbs: `lmforge pretrain-mlm`, `fill-mask`, `ner`, `qa` (fine-tuning: `lmforge finetune ...`).

    lmforge pretrain-mlm --config configs/pretrain/mlm-demo.yaml --out runs/mlm-demo
    lmforge fill-mask runs/mlm-demo "The [MASK] statement repeats a block of code." --top-k 5
    lmforge ner runs/ner "Angela Merkel visited New York." --aggregation simple [--stride 32]
    lmforge qa runs/qa --question "Where is Normandy?" --context "Normandy is a region in France."

Masked-LM pretraining is its own verb rather than a mode of `lmforge pretrain`: its settings (masking rate,
whole-word masking, a WordPiece vocabulary, encoder sizes) and its output (a BertForMaskedLM directory) share
little with the decoder recipe's, and one config dataclass per verb keeps `--help` and YAML checking exact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge import argconf
from lmforge.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.recipes.mlm import MLMConfig

    p = subparsers.add_parser("pretrain-mlm", help="pretrain a BERT-style encoder with masked-language modelling",
                              description="Masked-LM pretraining (15%% of tokens, 80/10/10); writes a "
                                          "BertForMaskedLM directory, metrics.jsonl and loss.png.")
    p.add_argument("--config", "-c", help="YAML file of config fields (e.g. configs/pretrain/mlm-demo.yaml)")
    argconf.add_arguments(p, MLMConfig)
    p.set_defaults(func=cmd_pretrain_mlm)

    f = subparsers.add_parser("fill-mask", help="predict the words hidden by [MASK] (masked-LM models)")
    f.add_argument("model", metavar="MODEL", help="encoder directory with a masked-LM head")
    f.add_argument("texts", nargs="+", metavar="TEXT", help="text(s) containing [MASK]")
    f.add_argument("--top-k", type=int, default=5, help="candidates per mask (default: 5)")
    f.add_argument("--targets", help="comma-separated words to choose from")
    f.add_argument("--json", action="store_true", help="print transformers-shaped JSON")
    f.set_defaults(func=cmd_fill_mask)

    n = subparsers.add_parser("ner", help="tag entities with a token-classification model")
    n.add_argument("model", metavar="MODEL", help="encoder directory with a token-classification head")
    n.add_argument("texts", nargs="+", metavar="TEXT", help="text(s) to tag")
    n.add_argument("--aggregation", default="simple", help="none, simple, first, average or max (default: simple)")
    n.add_argument("--stride", type=int, default=None,
                   help="tag a text longer than the model's limit whole, in windows sharing this many pieces "
                        "(default: cut it at the limit, with a warning)")
    n.add_argument("--json", action="store_true", help="print transformers-shaped JSON")
    n.set_defaults(func=cmd_ner)

    q = subparsers.add_parser("qa", help="answer a question from a passage (extractive QA model)")
    q.add_argument("model", metavar="MODEL", help="encoder directory with a question-answering head")
    q.add_argument("--question", "-q", required=True, help="the question")
    q.add_argument("--context", help="the passage to find the answer in")
    q.add_argument("--context-file", help="read the passage from this file")
    q.add_argument("--doc-stride", type=int, default=128, help="tokens shared by consecutive windows (default 128)")
    q.add_argument("--max-seq-len", type=int, default=384, help="tokens per window (default 384)")
    q.add_argument("--max-answer-len", type=int, default=15, help="longest answer in tokens (default 15)")
    q.add_argument("--top-k", type=int, default=1, help="answers to return (default 1)")
    q.add_argument("--handle-impossible-answer", action="store_true", help="allow the empty answer (SQuAD 2.0)")
    q.add_argument("--json", action="store_true", help="print transformers-shaped JSON")
    q.set_defaults(func=cmd_qa)


def cmd_pretrain_mlm(args: argparse.Namespace) -> int:
    from lmforge.recipes.mlm import MLMConfig, run_mlm

    run_mlm(argconf.from_cli(MLMConfig, args, args.config))
    return 0


def cmd_fill_mask(args: argparse.Namespace) -> int:
    from lmforge.tasks.common import load_encoder
    from lmforge.tasks.fill_mask import fill_mask

    lm = load_encoder(args.model, task="fill-mask")
    targets = [t for t in args.targets.split(",") if t] if args.targets else None
    results = fill_mask(lm, list(args.texts), top_k=args.top_k, targets=targets)
    for text, res in zip(args.texts, results):
        if args.json:
            print(json.dumps(res))
            continue
        for m, row in enumerate(res if isinstance(res[0], list) else [res]):
            if len(args.texts) > 1 or isinstance(res[0], list):
                print(f"# {text}" + (f" (mask {m + 1})" if isinstance(res[0], list) else ""))
            for d in row:
                print(f"{d['score']:.4f}\t{d['token_str']}\t{d['sequence']}")
    return 0


def cmd_ner(args: argparse.Namespace) -> int:
    from lmforge.tasks.common import load_encoder
    from lmforge.tasks.token_classification import token_classification

    lm = load_encoder(args.model, task="token classification (NER)")
    results = token_classification(lm, list(args.texts), aggregation_strategy=args.aggregation, stride=args.stride)
    for text, ents in zip(args.texts, results):
        if args.json:
            print(json.dumps(ents))
            continue
        if len(args.texts) > 1:
            print(f"# {text}")
        for e in ents:
            print(f"{e.get('entity_group', e.get('entity'))}\t{e['score']:.4f}\t{e['start']}:{e['end']}\t{e['word']}")
    return 0


def cmd_qa(args: argparse.Namespace) -> int:
    from lmforge.tasks.common import load_encoder
    from lmforge.tasks.question_answering import question_answering

    if args.context is not None and args.context_file:
        raise DataError("give --context or --context-file, not both")
    if args.context_file:
        try:
            context = Path(args.context_file).read_text(encoding="utf-8")
        except OSError as e:
            raise DataError(f"cannot read --context-file {args.context_file}: {e.strerror}") from None
    else:
        context = args.context or ""
    lm = load_encoder(args.model, task="question answering")
    res = question_answering(lm, args.question, context, doc_stride=args.doc_stride, max_seq_len=args.max_seq_len,
                             max_answer_len=args.max_answer_len, top_k=args.top_k,
                             handle_impossible_answer=args.handle_impossible_answer)
    if args.json:
        print(json.dumps(res))
        return 0
    for a in res if isinstance(res, list) else [res]:
        print(f"{a['score']:.4f}\t{a['start']}:{a['end']}\t{a['answer'] or '(no answer)'}")
    return 0
