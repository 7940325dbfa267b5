"""In-context classification of the SMS Spam Collection by a real, small, offline model, and the cost and
validity of JSON-constrained generation.

    python benchmarks/bench_fewshot.py                                   # stories260K, shots 0,1,4,8, 3 seeds
    python benchmarks/bench_fewshot.py --model runs/demo --shots 0,4 --per-label 50 --out runs/bench-fewshot

Part 1 (few-shot): a balanced test set (`--per-label` messages of each label, held out from the demonstrations);
for each k and seed, k balanced demonstrations in a plain "Input: ...\\nLabel: ..." prompt; accuracy and balanced
accuracy (chance: 0.5) of three readers: label log-likelihood (score), the same divided by the content-free label
prior (calibrated score, Zhao et al. 2021), and the parsed greedy answer (generate). stories260K (260K parameters,
trained on children's stories) is the only real causal LM on disk; expect chance, and read the confusion matrix to
see which way it leans.

Part 2 (JSON): the same model writes `--json-runs` sampled answers under a JSON schema, under JSON mode, and with
no constraint; how many parse (and validate, with `jsonschema` when installed), and tokens per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"

SCHEMA = {"type": "object", "properties": {  # every part bounded, so every answer can finish
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
    "mood": {"enum": ["happy", "sad", "angry"]}, "best_friend": {"type": "string", "maxLength": 12}}}


def fewshot(lm, args) -> dict:
    from lmforge.tasks import prompting as P

    examples = P.load_examples(args.data)
    import random

    random.Random(1234).shuffle(examples)
    pool, rest = examples[:len(examples) // 2], examples[len(examples) // 2:]
    test = P.balanced_subset(rest, args.per_label, seed=1234)
    labels = sorted({e.label for e in test})
    fmt = P.PromptFormat()
    rows = []
    for k in args.shots:
        for seed in args.seeds:
            shots = P.draw_shots(pool, k, seed=seed, balanced=True)
            t0 = time.perf_counter()
            cal = P.evaluate_fewshot(lm, shots, test, labels, "score", fmt, calibrate=True)
            t_score = time.perf_counter() - t0
            raw_preds = [labels[max(range(len(labels)), key=r.__getitem__)] for r in cal.label_logprobs]
            acc, bal, conf, _ = P.classification_scores([e.label for e in test], raw_preds, labels)
            t0 = time.perf_counter()
            gen = P.evaluate_fewshot(lm, shots, test, labels, "generate", fmt)
            t_gen = time.perf_counter() - t0
            row = {"shots": k, "seed": seed,
                   "score": {"accuracy": acc, "balanced_accuracy": bal, "confusion": conf},
                   "calibrated": {"accuracy": cal.accuracy, "balanced_accuracy": cal.balanced_accuracy,
                                  "confusion": cal.confusion, "label_prior": cal.label_prior},
                   "generate": {"accuracy": gen.accuracy, "balanced_accuracy": gen.balanced_accuracy,
                                "confusion": gen.confusion, "columns": gen.columns, "unparsed": gen.unparsed},
                   "truncated": cal.truncated, "seconds_score": round(t_score, 1), "seconds_generate": round(t_gen, 1)}
            rows.append(row)
            print(f"{k}-shot seed {seed}: score {bal:.3f} {conf}  calibrated {cal.balanced_accuracy:.3f} "
                  f"{cal.confusion} (prior {[round(p, 3) for p in cal.label_prior]})  generate "
                  f"{gen.balanced_accuracy:.3f} {gen.confusion} unparsed {gen.unparsed}  "
                  f"[{t_score:.0f} s + {t_gen:.0f} s]", flush=True)
    return {"n_test": len(test), "labels": labels, "rows": rows}


def fewshot_table(result: dict, shots, seeds) -> str:
    lines = ["| k | score: balanced acc. (mean, min-max over seeds) | calibrated score | generate "
             "| generate unparsed |",
             "|---|---|---|---|---|"]
    for k in shots:
        rs = [r for r in result["rows"] if r["shots"] == k]

        def cell(key):
            v = [r[key]["balanced_accuracy"] for r in rs]
            return f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})"

        unparsed = sum(r["generate"]["unparsed"] for r in rs) / (len(rs) * result["n_test"])
        lines.append(f"| {k} | {cell('score')} | {cell('calibrated')} | {cell('generate')} | {unparsed:.0%} |")
    return "\n".join(lines)


def random_gpt2_vocab_lm():
    """The slow case for constrained decoding: a random model (most draws refused) over GPT-2's 50,257 tokens."""
    import torch

    from lmforge.lm import LM
    from lmforge.models.config import ModelConfig
    from lmforge.models.decoder import Transformer
    from lmforge.tokenizers.bpe import Tokenizer

    tok = Tokenizer.from_gpt2_files(DATA / "gpt2" / "encoder.json", DATA / "gpt2" / "vocab.bpe")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt-tiny", vocab_size=50257, block_size=256, n_layer=1, n_embd=32, init_std=0.2)
    return LM(Transformer(cfg).eval(), tok, cfg)


def json_runs(lm, args, modes=("none", "json", "json_schema"), label="") -> dict:
    """`args.json_runs` sampled answers per mode; the modes take turns (seed by seed) so that a shared machine's
    load swings hit them alike."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    controls = {"none": {}, "json": {"json": True}, "json_schema": {"json_schema": SCHEMA}}
    stats = {m: {"runs": 0, "complete": 0, "valid": 0, "tokens": 0, "seconds": 0.0} for m in modes}
    for seed in range(args.json_runs):
        for mode in modes:
            t0 = time.perf_counter()
            text = lm.generate("Once upon a time", temperature=0.8, seed=seed, max_new_tokens=args.json_tokens,
                               **controls[mode])
            st = stats[mode]
            st["seconds"] += time.perf_counter() - t0
            st["runs"] += 1
            st["tokens"] += len(text.token_ids)
            st["complete"] += text.finish_reason == "stop"
            try:
                doc = json.loads(text)
                if mode == "json_schema" and jsonschema is not None:
                    jsonschema.validate(doc, SCHEMA)
                st["valid"] += mode == "none" or isinstance(doc, dict)
            except (ValueError, getattr(jsonschema, "ValidationError", ValueError)):
                pass
    for mode, st in stats.items():
        st["tokens_per_s"] = round(st["tokens"] / st["seconds"], 1)
        print(f"json{label} {mode}: {st['valid']}/{st['runs']} parse{' and validate' if mode == 'json_schema' else ''}"
              f", {st['complete']} complete, {st['tokens_per_s']} tokens/s", flush=True)
    return stats


def main(argv=None) -> int:
    import torch

    import lmforge

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DATA / "stories260K" / "stories260K.bin"))
    p.add_argument("--data", default=str(DATA / "sms_spam_collection" / "SMSSpamCollection"))
    p.add_argument("--shots", default="0,1,4,8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--per-label", type=int, default=100)
    p.add_argument("--json-runs", type=int, default=20)
    p.add_argument("--json-tokens", type=int, default=120)
    p.add_argument("--skip-fewshot", action="store_true")
    p.add_argument("--worst-case", action="store_true",
                   help="also time json_schema on a random model with GPT-2's 50k vocabulary (the slow case)")
    p.add_argument("--out", help="write results.json here")
    args = p.parse_args(argv)
    args.shots = [int(x) for x in args.shots.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    if not Path(args.model).exists() or not Path(args.data).exists():
        print(f"error: {args.model} or {args.data} is missing", file=sys.stderr)
        return 1
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; model {args.model}")
    lm = lmforge.load(args.model)
    result = {"model": args.model, "data": args.data}
    if not args.skip_fewshot:
        result["fewshot"] = fewshot(lm, args)
        print(fewshot_table(result["fewshot"], args.shots, args.seeds))
    result["json"] = json_runs(lm, args)
    if args.worst_case:
        args.json_runs = min(args.json_runs, 3)
        result["json_random_gpt2_vocab"] = json_runs(random_gpt2_vocab_lm(), args, ("none", "json_schema"),
                                                     " (random model, GPT-2 vocabulary)")
    if args.out:
        from lmforge.utils import atomic_write_json

        atomic_write_json(Path(args.out) / "results.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
