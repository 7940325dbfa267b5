"""Recipe: fine-tune a language model into a text classifier (the course's spam classifier).

    lmforge finetune classify runs/demo --data SMSSpamCollection --out runs/spam --epochs 3
    lmforge classify runs/spam "WINNER!! Claim your prize now"

Reads TSV/CSV/JSONL (text + label), splits it train/val/test (seeded) unless val/test files are given, puts a
class head on the last real token (`finetune.classifier`), trains the last `train_layers` blocks + final norm +
head (or LoRA adapters + head) with the one training loop, then reports accuracy, precision, recall and F1 with a
confusion-matrix PNG per split, and saves a model directory that `lmforge classify` reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.finetune import common, data as D, lora
from lmforge.finetune.classifier import classification_loss, predict, save_classifier, SequenceClassifier, set_trainable
from lmforge.finetune.metrics import classification_metrics, plot_confusion
from lmforge.lm import LM
from lmforge.training.loop import train
from lmforge.utils import atomic_write_json


@dataclass
class ClassifyConfig(common.FinetuneConfig):
    text_field: str = field(default="text", metadata={"help": "record field holding the text"})
    label_field: str = field(default="label", metadata={"help": "record field holding the label"})
    train_layers: int = field(default=1, metadata={"help": "train the last N blocks + final norm + head (-1: all)"})
    balance: bool = field(default=False, metadata={"help": "class-balanced sampling of training batches"})
    group_by_length: bool = field(default=True, metadata={"help": "batch texts of similar length (less padding)"})
    undersample: bool = field(default=False, metadata={
        "help": "before splitting, drop random examples of larger classes down to the smallest (the course's setup)"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule: cosine, constant or wsd"})
    max_steps: int = field(default=500, metadata={"help": "optimizer steps (unless --epochs is given)"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps (0: only at the end)"})


def undersample(records: list[dict], label_field: str, seed: int) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(str(r.get(label_field, "")).strip(), []).append(r)
    n = min(len(v) for v in by.values())
    rng = random.Random(seed)
    return [r for k in sorted(by) for r in rng.sample(by[k], n)]


def run_classify(cfg: ClassifyConfig, log=print) -> dict:
    """Train, evaluate on every split, save; returns {split: metrics}."""
    cfg.check_paths()
    lm = common.load_base(cfg)
    tok, out = lm.tokenizer, Path(cfg.out)
    records = D.read_records(cfg.data)
    if cfg.undersample:
        records = undersample(records, cfg.label_field, cfg.split_seed)
    if cfg.val_data or cfg.test_data:
        parts = {"train": records, "val": D.read_records(cfg.val_data) if cfg.val_data else [],
                 "test": D.read_records(cfg.test_data) if cfg.test_data else []}
    else:
        parts = dict(zip(("train", "val", "test"), D.split(records, cfg.split, cfg.split_seed)))
    texts = {k: D.classification_examples(v, cfg.text_field, cfg.label_field, f"{k} data") for k, v in parts.items()}
    labels = sorted(set(texts["train"][1]))
    L = common.max_length(cfg, lm.model)
    enc = {k: list(zip(D.encode_texts(tok, t, L), D.label_ids(y, labels, f"{k} data"))) for k, (t, y) in texts.items()}

    clf = SequenceClassifier(lm.model, labels)
    uses_lora = common.maybe_lora(lm.model, cfg, log)
    set_trainable(clf, 0 if uses_lora else cfg.train_layers)  # with LoRA: adapters + final norm + head
    pad = common.pad_id(tok)
    collate = lambda items: D.classification_collate(items, pad)  # noqa: E731
    weights = D.balanced_weights([y for _, y in enc["train"]]) if cfg.balance else None
    lengths = [len(ids) for ids, _ in enc["train"]] if cfg.group_by_length else None
    batches = D.Batches(enc["train"], cfg.batch_size, collate, seed=cfg.seed, weights=weights, lengths=lengths)
    val = D.Batches(enc["val"], cfg.batch_size, collate, shuffle=False).all() if enc["val"] else None
    log(f"{len(labels)} labels {labels} | {', '.join(f'{k} {len(v)}' for k, v in enc.items())} examples | "
        f"max {L} tokens")

    def save(d: Path) -> None:
        if not uses_lora:
            return save_classifier(clf, lm, d, L)
        import copy

        base = lora.merge_and_unload(copy.deepcopy(lm.model))  # a classifier directory holds a whole model
        merged = SequenceClassifier(base, labels)
        merged.head.load_state_dict(clf.head.state_dict())
        save_classifier(merged, LM(base, tok, lm.config, lm.generation_config, lm.chat_template), d, L)

    train(clf, batches, cfg.train_config(len(batches)), val_data=val, loss_fn=classification_loss, out_dir=out,
          save_model=save, log=log)
    results = {}
    for split, items in enc.items():
        if not items:
            continue
        probs = predict(clf, tok, texts[split][0], L, batch_size=cfg.batch_size * 2, pad_id=pad)
        m = classification_metrics([y for _, y in items], probs.argmax(-1).tolist(), labels)
        plot_confusion(m["confusion_matrix"], labels, out / f"confusion_{split}.png", f"{split}: accuracy "
                       f"{m['accuracy']:.2%}")
        results[split] = m
        log(f"{split:5s} accuracy {m['accuracy']:.2%}  macro F1 {m['macro_f1']:.3f}  (n={m['n']})")
    atomic_write_json(out / "metrics.json", results)
    return results
