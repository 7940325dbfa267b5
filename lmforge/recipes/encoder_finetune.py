"""Recipes: fine-tune a BERT-family encoder for classification, NER or extractive QA on the one training loop.

    lmforge finetune classify MiniLM/ --data SMSSpamCollection --out runs/spam --epochs 2 --lr 5e-5
    lmforge finetune classify MiniLM/ --data nli.jsonl --text-pair-field hypothesis --out runs/nli
    lmforge finetune ner MiniLM/ --data ner.jsonl --out runs/ner          # {"tokens": [...], "tags": [...]}
    lmforge finetune qa MiniLM/ --data squad2-dev-sample.json --out runs/qa --doc-stride 64

Each recipe: load the encoder, put the task head on it (`lmforge.tasks.common.task_model`: the checkpoint's own
head, or a new one), encode the data with the task's own alignment (`lmforge.tasks.*`), train with
`lmforge.training.loop.train` (LoRA adapters on q_proj/v_proj with --lora-r; the head always trains), score each
split, and write a Hugging Face directory (Bert/DistilBert/RobertaFor<Task>, id2label in config.json) that loads
here (`lmforge ner|qa|classify-text`) and in transformers' pipelines. `lmforge finetune classify` on a decoder
runs the decoder recipe (lmforge.recipes.classify) unchanged.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.finetune import common, data as D
from lmforge.finetune.metrics import classification_metrics
from lmforge.formats.bert import is_encoder_dir
from lmforge.recipes.classify import ClassifyConfig, run_classify as run_decoder_classify, undersample
from lmforge.tasks import question_answering as QA, token_classification as TC
from lmforge.tasks.common import forward_batches, labels_of, load_encoder, save_task_model, task_model, TaskModel
from lmforge.tasks.text_classification import classification_loss, encode_inputs, predict_label_ids
from lmforge.training.loop import train
from lmforge.utils import atomic_write_json


@dataclass
class EncoderClassifyConfig(ClassifyConfig):
    text_pair_field: str = field(default="", metadata={
        "help": "encoders: record field of the second sentence (NLI-style pairs: [CLS] text [SEP] pair [SEP])"})
    labels_file: str = field(default="", metadata={"help": "encoders: label names, one per line (default: the "
                                                           "labels found in the training data)"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps (unless --epochs is given)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})


@dataclass
class NERConfig(common.FinetuneConfig):
    tokens_field: str = field(default="tokens", metadata={"help": "record field holding the list of words"})
    tags_field: str = field(default="tags", metadata={"help": "record field holding one BIO tag per word"})
    labels_file: str = field(default="", metadata={"help": "label names, one per line (default: the model's, or "
                                                           "those found in the training data)"})
    label_all_tokens: bool = field(default=False, metadata={"help": "label every piece of a word (B- becomes I- "
                                                                    "after the first), not only the first"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule: cosine, constant or wsd"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps (unless --epochs is given)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps (0: only at the end)"})


@dataclass
class QAConfig(common.FinetuneConfig):
    max_seq_len: int = field(default=384, metadata={"help": "tokens per window: question + passage piece + 3"})
    doc_stride: int = field(default=128, metadata={"help": "passage tokens shared by consecutive windows"})
    max_answer_len: int = field(default=30, metadata={"help": "longest answer in tokens when predicting"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    schedule: str = field(default="constant", metadata={"help": "learning-rate schedule: cosine, constant or wsd"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps (unless --epochs is given)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every N steps (0: only at the end)"})


# ---- shared steps ----------------------------------------------------------------------------------------------------
def _read_label_file(path: str) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise ConfigError(f"cannot read labels file {path}: {e.strerror}") from None
    if len(set(names)) != len(names) or not names:
        raise DataError(f"{path}: label names must be unique and at least one")
    return names


def _labels(cfg, lm, kind: str, data_labels: Sequence[str]) -> list[str]:
    """The label list: from --labels-file, else the model's own (a trained head of this kind), else the data's.
    A label file or data that does not match the model's trained labels is a one-line error."""
    model_labels = labels_of(lm) if lm.head_kind == kind else None
    labels = _read_label_file(cfg.labels_file) if cfg.labels_file else None
    if labels is not None and model_labels is not None and labels != model_labels:
        raise CheckpointError(f"{cfg.labels_file} lists labels {labels} but the model's {kind} head was trained "
                              f"on {model_labels}")
    where = cfg.labels_file or (f"{cfg.model}'s labels" if model_labels else "")
    labels = labels or model_labels or sorted(set(data_labels))
    unknown = sorted(set(data_labels) - set(labels))
    if unknown:
        raise DataError(f"the data uses label {unknown[0]!r}, which is not in {where} ({', '.join(labels)})")
    return labels


def _prepare(cfg, kind: str, labels: Sequence[str] | None, lm, log) -> tuple[TaskModel, bool]:
    model = task_model(lm, kind, num_labels=len(labels) if labels else None, require_head=False)
    uses_lora = cfg.lora_r > 0
    if uses_lora:
        from lmforge.finetune import lora

        if cfg.quantize:
            raise ConfigError("--quantize (QLoRA) is for decoders; encoders train LoRA over float weights")
        # adapters go on the blocks (lora.resolve_targets reads a *decoder* config to map HF names, so it is
        # handed the block list, which has none); then everything but adapters, pooler and head is frozen
        lora.add_lora(model.encoder.blocks, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha,
                      dropout=cfg.lora_dropout, freeze_base=False)
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name or name.startswith(("head.", "encoder.pooler.")))
        log(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} on {','.join(cfg.lora_targets)}: "
            f"{lora.trainable_report(model)}")
    return model, uses_lora


def _saver(lm, model: TaskModel, labels, uses_lora: bool, cfg) -> Callable[[Path], None]:
    def save(d: Path) -> None:
        if uses_lora:  # a model directory holds whole weights: merge a copy, leave the training model as it is
            from lmforge.finetune import lora

            merged_lm = copy.copy(lm)
            merged = copy.deepcopy(model)
            merged_lm.model = lora.merge_and_unload(merged.encoder)
            merged.encoder = merged_lm.model
            save_task_model(merged_lm, merged, d, labels)
        else:
            save_task_model(lm, model, d, labels)
        atomic_write_json(Path(d) / "finetune_config.json", {k: v for k, v in vars(cfg).items()})

    return save


def _collate(tok, extra: Callable[[list, int], dict]) -> Callable[[list], dict]:
    def collate(items: list) -> dict[str, torch.Tensor]:
        b = tok.pad([e for e, _ in items], padding=True, return_tensors="pt")
        out = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        out.update(extra([y for _, y in items], out["input_ids"].shape[1]))
        return out

    return collate


def _fit(cfg, lm, model, enc: dict[str, list], collate, loss_fn, save, log, on_epoch=None) -> None:
    batches = D.Batches(enc["train"], cfg.batch_size, collate, seed=cfg.seed,
                        lengths=[len(e) for e, _ in enc["train"]])
    val = D.Batches(enc["val"], cfg.batch_size, collate, shuffle=False).all() if enc.get("val") else None
    per_epoch = max(1, len(batches) // cfg.grad_accum_steps)  # optimizer steps in one pass over the data

    def on_step(rec: dict) -> None:
        if on_epoch is not None and rec["step"] % per_epoch == 0:
            on_epoch(rec["step"] // per_epoch, model)
            model.train()

    train(model, batches, cfg.train_config(len(batches)), val_data=val, loss_fn=loss_fn, out_dir=cfg.out,
          save_model=save, log=log, on_step=on_step)


def _split(items: list, cfg) -> dict[str, list]:
    if cfg.val_data or cfg.test_data:
        raise ConfigError("internal: explicit files are handled by the caller")
    return dict(zip(("train", "val", "test"), D.split(items, cfg.split, cfg.split_seed)))


def _max_len(cfg, lm) -> int:
    cap = min(lm.max_seq_length, lm.tokenizer.model_max_length)
    if cfg.max_length and cfg.max_length > cap:
        raise ConfigError(f"max_length {cfg.max_length} is longer than the encoder's {cap} positions")
    return cfg.max_length or cap


# ---- sequence classification ---------------------------------------------------------------------------------------
def run_classify(cfg: EncoderClassifyConfig, log=print) -> dict:
    """`lmforge finetune classify`: the encoder recipe for an encoder, the decoder recipe for a decoder."""
    cfg.check_paths()

    if not is_encoder_dir(cfg.model):
        if cfg.text_pair_field or cfg.labels_file:
            raise ConfigError(f"{cfg.model} is a decoder; --text-pair-field and --labels-file are for encoders")
        fields = {f: getattr(cfg, f) for f in ClassifyConfig.__dataclass_fields__}
        return run_decoder_classify(ClassifyConfig(**fields), log)
    return run_encoder_classify(cfg, log)


def run_encoder_classify(cfg: EncoderClassifyConfig, log=print) -> dict:
    """Train a sentence (or sentence-pair) classifier; returns {split: metrics}."""
    lm = load_encoder(cfg.model, dtype="float32", task="sequence classification")
    records = D.read_records(cfg.data)
    if cfg.undersample:
        records = undersample(records, cfg.label_field, cfg.split_seed)
    parts = ({"train": records, "val": D.read_records(cfg.val_data) if cfg.val_data else [],
              "test": D.read_records(cfg.test_data) if cfg.test_data else []}
             if cfg.val_data or cfg.test_data else _split(records, cfg))
    texts = {k: D.classification_examples(v, cfg.text_field, cfg.label_field, f"{k} data") for k, v in parts.items()}
    pairs = {k: _pairs(v, cfg.text_pair_field, k) for k, v in parts.items()}
    labels = _labels(cfg, lm, "sequence_classification", [y for t in texts.values() for y in t[1]])
    L = _max_len(cfg, lm)
    enc = {k: list(zip(encode_inputs(lm.tokenizer, t, pairs[k], L), D.label_ids(y, labels, f"{k} data")))
           for k, (t, y) in texts.items() if t}
    model, uses_lora = _prepare(cfg, "sequence_classification", labels, lm, log)
    log(f"{len(labels)} labels {labels} | {', '.join(f'{k} {len(v)}' for k, v in enc.items())} examples | "
        f"max {L} tokens")
    collate = _collate(lm.tokenizer, lambda ys, T: {"labels": torch.tensor(ys)})
    _fit(cfg, lm, model, enc, collate, classification_loss, _saver(lm, model, labels, uses_lora, cfg), log)
    results = {}
    for split, items in enc.items():
        pred = predict_label_ids(model, lm.tokenizer, [e for e, _ in items], cfg.batch_size * 2)
        results[split] = m = classification_metrics([y for _, y in items], pred, labels)
        log(f"{split:5s} accuracy {m['accuracy']:.2%}  macro F1 {m['macro_f1']:.3f}  (n={m['n']})")
    atomic_write_json(Path(cfg.out) / "metrics.json", results)
    return results


def _pairs(records: list[dict], field_name: str, split: str) -> list[str] | None:
    if not field_name or not records:
        return None
    out = []
    for i, r in enumerate(records):
        if not isinstance(r.get(field_name), str) or not r[field_name].strip():
            raise DataError(f"{split} data: record {i} has no {field_name!r} (second sentence)")
        out.append(r[field_name])
    return out


# ---- token classification (NER) -----------------------------------------------------------------------------------
def _ner_examples(records: list[dict], cfg: NERConfig, split: str) -> list[tuple[list[str], list[str]]]:
    out = []
    for i, r in enumerate(records):
        words, tags = r.get(cfg.tokens_field), r.get(cfg.tags_field)
        if not isinstance(words, list) or not isinstance(tags, list) or not words:
            raise DataError(f"{split} data: record {i} needs lists {cfg.tokens_field!r} and {cfg.tags_field!r}")
        if len(words) != len(tags):
            raise DataError(f"{split} data: record {i} has {len(words)} words but {len(tags)} tags")
        out.append(([str(w) for w in words], [str(t) for t in tags]))
    return out


def run_ner(cfg: NERConfig, log=print) -> dict:
    """Train a token classifier on words with BIO tags; returns {split: entity precision/recall/F1}."""
    cfg.check_paths()
    lm = load_encoder(cfg.model, dtype="float32", task="token classification (NER)")
    records = D.read_records(cfg.data)
    parts = ({"train": records, "val": D.read_records(cfg.val_data) if cfg.val_data else [],
              "test": D.read_records(cfg.test_data) if cfg.test_data else []}
             if cfg.val_data or cfg.test_data else _split(records, cfg))
    examples = {k: _ner_examples(v, cfg, k) for k, v in parts.items()}
    labels = _labels(cfg, lm, "token_classification", [t for ex in examples.values() for _, tags in ex for t in tags])
    index = {lab: i for i, lab in enumerate(labels)}
    L = _max_len(cfg, lm)
    enc: dict[str, list] = {}
    for split, exs in examples.items():
        enc[split] = []
        for words, tags in exs:
            e, piece_word = TC.encode_words(lm.tokenizer, words, L)
            enc[split].append((e, TC.align_labels(piece_word, [index[t] for t in tags], labels,
                                                   cfg.label_all_tokens)))
    enc = {k: v for k, v in enc.items() if v}
    model, uses_lora = _prepare(cfg, "token_classification", labels, lm, log)
    log(f"{len(labels)} labels | {', '.join(f'{k} {len(v)}' for k, v in enc.items())} sentences | max {L} tokens")

    def pad_labels(ys: list, T: int) -> dict:
        return {"labels": torch.tensor([y + [-100] * (T - len(y)) for y in ys])}

    _fit(cfg, lm, model, enc, _collate(lm.tokenizer, pad_labels), TC.token_classification_loss,
         _saver(lm, model, labels, uses_lora, cfg), log)

    results = {}
    for split, items in enc.items():
        outs = [row for o in forward_batches(model, lm.tokenizer, [e for e, _ in items], cfg.batch_size * 2)
                for row in o]
        pred_tags, true_tags = [], []
        for (e, y), lg, (words, tags) in zip(items, outs, examples[split]):
            first = [i for i, lab in enumerate(y) if lab != -100]  # the first piece of each (kept) word
            pred = lg[:len(e)].argmax(-1).tolist()
            pred_tags.append([labels[pred[i]] for i in first])
            true_tags.append(tags[:len(first)])
        results[split] = m = TC.ner_metrics(true_tags, pred_tags)
        log(f"{split:5s} entity F1 {m['f1']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
            f"token accuracy {m['accuracy']:.2%}")
    atomic_write_json(Path(cfg.out) / "metrics.json", results)
    return results


# ---- extractive question answering ---------------------------------------------------------------------------------
def split_by_context(examples: list[dict], fractions: Sequence[float], seed: int) -> list[list[dict]]:
    """Split SQuAD questions by passage, so no passage is seen in training and scored later."""
    contexts = sorted({e["context"] for e in examples})
    random.Random(seed).shuffle(contexts)
    groups = D.split(contexts, fractions, seed)
    where = {c: i for i, g in enumerate(groups) for c in g}
    return [[e for e in examples if where[e["context"]] == i] for i in range(len(groups))]


def qa_features(tok, examples: list[dict], max_seq_len: int, doc_stride: int) -> list[tuple[Any, tuple[int, int]]]:
    """(encoding, (start, end)) for every window of every question ([CLS] (0, 0) where the answer is not in it)."""
    out = []
    for ex in examples:
        ans = ex["answers"][0] if ex["answers"] and not ex.get("is_impossible") else None
        for w in QA.qa_windows(tok, ex["question"], ex["context"], max_seq_len, doc_stride):
            pos = QA.answer_positions(w, ans["answer_start"] if ans else None, ans["text"] if ans else "")
            out.append((QA._as_encoding(w), pos))
    return out


def predict_squad(lm, model, examples: list[dict], cfg: QAConfig) -> dict[str, str]:
    preds = QA.question_answering(lm, [e["question"] for e in examples], [e["context"] for e in examples],
                                  doc_stride=cfg.doc_stride, max_seq_len=cfg.max_seq_len,
                                  max_answer_len=cfg.max_answer_len, handle_impossible_answer=True,
                                  batch_size=cfg.batch_size * 2, model=model)
    return {e["id"]: p["answer"] for e, p in zip(examples, preds)}


def run_qa(cfg: QAConfig, log=print, on_epoch: Callable[[int, TaskModel], None] | None = None) -> dict:
    """Train an extractive-QA head on SQuAD-format data; returns {split: SQuAD v2 exact/f1}.

    on_epoch(epoch, model) is called after each whole pass over the training windows, for a learning curve
    (`question_answering(lm, ..., model=model)` answers with the model as it is then); training goes on in
    training mode whatever mode on_epoch leaves the model in."""
    cfg.check_paths()
    lm = load_encoder(cfg.model, dtype="float32", task="question answering")
    read = lambda p: QA.read_squad(json.loads(Path(p).read_text(encoding="utf-8")))  # noqa: E731
    try:
        examples = read(cfg.data)
        parts = ({"train": examples, "val": read(cfg.val_data) if cfg.val_data else [],
                  "test": read(cfg.test_data) if cfg.test_data else []}
                 if cfg.val_data or cfg.test_data else
                 dict(zip(("train", "val", "test"), split_by_context(examples, cfg.split, cfg.split_seed))))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise DataError(f"{cfg.data}: cannot read SQuAD data ({type(e).__name__}: {e})") from None
    max_seq_len = min(cfg.max_seq_len, lm.max_seq_length)
    enc = {k: qa_features(lm.tokenizer, v, max_seq_len, cfg.doc_stride) for k, v in parts.items() if v}
    model, uses_lora = _prepare(cfg, "question_answering", None, lm, log)
    log(f"{', '.join(f'{k} {len(parts[k])} questions / {len(v)} windows' for k, v in enc.items())} | "
        f"max_seq_len {max_seq_len}, doc_stride {cfg.doc_stride}")

    def positions(ys: list, T: int) -> dict:
        return {"start_positions": torch.tensor([s for s, _ in ys]), "end_positions": torch.tensor([e for _, e in ys])}

    _fit(cfg, lm, model, enc, _collate(lm.tokenizer, positions), QA.qa_loss, _saver(lm, model, None, uses_lora, cfg),
         log, on_epoch)
    results = {}
    for split, exs in parts.items():
        if exs:
            results[split] = m = QA.squad_v2_metrics(exs, predict_squad(lm, model, exs, cfg))
            log(f"{split:5s} EM {m['exact']:.2f}  F1 {m['f1']:.2f}  (n={m['total']}; HasAns "
                f"{m.get('HasAns_total', 0)}, NoAns {m.get('NoAns_total', 0)})")
    atomic_write_json(Path(cfg.out) / "metrics.json", results)
    return results
