"""Recipes: pretrain a small T5 with span corruption, fine-tune an encoder-decoder on (input text -> target text)
pairs (full or LoRA), and measure exact match. All three run on the one loop (`lmforge.training.loop.train`,
`loss_fn=seq2seq_loss`).

    lmforge seq2seq pretrain --config configs/seq2seq/pretrain-demo.yaml --out runs/t5-demo
    lmforge seq2seq finetune --config configs/seq2seq/dates.yaml --model runs/t5-demo --out runs/t5-dates
    lmforge seq2seq eval runs/t5-dates --data dates --num-beams 4

Span corruption (T5's pretraining objective, Raffel et al. 2020, section 3.1.4). Drop ~15% of a text's tokens in
short spans (mean length 3); the input keeps the rest with one sentinel per dropped span, the target lists the
dropped spans, each after its sentinel, and a last sentinel:

    text    Thank you for inviting me to your party last week .
    input   Thank you <extra_id_0> me to your party <extra_id_1> week .
    target  <extra_id_0> for inviting <extra_id_1> last <extra_id_2>

The decoder learns to write what is missing from both sides of a gap: an encoder-decoder analogue of
next-token prediction that trains the encoder and the cross-attention too, with short targets (cheap to train).

Data: `data: dates` is the built-in checkable task (dates rewritten between formats from templates, e.g.
"to iso: March 14, 2021" -> "2021-03-14"); a .jsonl file of {"input": ..., "target": ...} rows is any other task.
"""

from __future__ import annotations

import datetime
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.finetune import lora
from lmforge.loader import load
from lmforge.models.t5 import seq2seq_loss, T5, T5Config
from lmforge.seq2seq_lm import Seq2SeqLM
from lmforge.tokenizers.unigram import UnigramTokenizer
from lmforge.training.data import read_documents, source_list
from lmforge.training.loop import train, TrainConfig
from lmforge.utils import atomic_write_json

SENTINEL = "<extra_id_{}>"


# ----------------------------------------------------------------------------------------------------------------
# Span corruption
# ----------------------------------------------------------------------------------------------------------------
def _random_segmentation(total: int, n: int, rng: random.Random) -> list[int]:
    """Cut `total` items into `n` non-empty runs at random: 7, 3 -> e.g. [2, 4, 1]."""
    cuts = sorted(rng.sample(range(1, total), n - 1)) if n > 1 else []
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:])]


def span_corrupt(ids: Sequence[int], sentinel_ids: Sequence[int], rng: random.Random,
                 noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of T5's span corruption for one token sequence (no EOS: the caller adds it).

    As T5's `random_spans_noise_mask`: round(n * density) noise tokens in round(noise / mean_span) spans,
    noise and kept runs alternating, starting with a kept run. sentinel_ids[k] stands for span k.
    """
    n = len(ids)
    n_noise = min(max(1, round(n * noise_density)), n - 1)
    n_spans = min(max(1, round(n_noise / mean_span)), len(sentinel_ids) - 1, n - n_noise)
    noise_lens = _random_segmentation(n_noise, n_spans, rng)
    keep_lens = _random_segmentation(n - n_noise, n_spans, rng)
    inputs, targets, pos = [], [], 0
    for k, (keep, noise) in enumerate(zip(keep_lens, noise_lens)):
        inputs += list(ids[pos:pos + keep]) + [sentinel_ids[k]]
        pos += keep
        targets += [sentinel_ids[k]] + list(ids[pos:pos + noise])
        pos += noise
    inputs += list(ids[pos:])
    return inputs, targets + [sentinel_ids[n_spans]]


# ----------------------------------------------------------------------------------------------------------------
# The built-in checkable task: dates between formats
# ----------------------------------------------------------------------------------------------------------------
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DATE_FORMATS = {
    "iso": lambda d: f"{d.year:04d}-{d.month:02d}-{d.day:02d}",
    "us": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year:04d}",
    "long": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "european": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
}


def date_examples(n: int, seed: int) -> list[dict[str, str]]:
    """n examples {"input": "to <format>: <date in another format>", "target": "<date in that format>"}, dates
    drawn uniformly from 1950-2049. The answer is a function of the input, so exact match can be measured."""
    rng = random.Random(seed)
    start, days = datetime.date(1950, 1, 1), (datetime.date(2049, 12, 31) - datetime.date(1950, 1, 1)).days
    out = []
    for _ in range(n):
        d = start + datetime.timedelta(days=rng.randrange(days + 1))
        src, dst = rng.sample(sorted(DATE_FORMATS), 2)
        out.append({"input": f"to {dst}: {DATE_FORMATS[src](d)}", "target": DATE_FORMATS[dst](d)})
    return out


def read_pairs(source: str, n: int = 0, seed: int = 0) -> list[dict[str, str]]:
    """`dates` (n generated examples) or a .jsonl file of {"input", "target"} rows (one-line DataError if bad)."""
    if source == "dates":
        return date_examples(n or 2000, seed)
    p = Path(source)
    if not p.is_file():
        raise DataError(f"{source}: no such file (give a .jsonl of {{\"input\", \"target\"}} rows, or 'dates')")
    rows = []
    for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{k}: not JSON ({e.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("input"), str) and isinstance(row.get("target"), str)):
            raise DataError(f"{p}:{k}: each row needs string fields 'input' and 'target'")
        rows.append({"input": row["input"], "target": row["target"]})
    if not rows:
        raise DataError(f"{p}: no rows")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Batches for the loop
# ----------------------------------------------------------------------------------------------------------------
def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """[(input ids, target ids)] -> input_ids/attention_mask (B, S) right-padded, labels (B, T) with -100 padding."""
    S, T = max(len(a) for a, _ in pairs), max(len(b) for _, b in pairs)
    ids = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(pairs), S, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for r, (a, b) in enumerate(pairs):
        ids[r, :len(a)], mask[r, :len(a)], labels[r, :len(b)] = torch.tensor(a), 1, torch.tensor(b)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PairBatches:
    """index -> batch over tokenized (input, target) pairs, reshuffled every epoch from `seed` (resumable)."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int):
        if not pairs:
            raise DataError("no training examples")
        self.pairs, self.batch_size, self.pad_id, self.seed = pairs, batch_size, pad_id, seed

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        per_epoch = max(1, len(self.pairs) // self.batch_size)
        epoch, k = divmod(index, per_epoch)
        order = list(range(len(self.pairs)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        take = order[k * self.batch_size:(k + 1) * self.batch_size]
        return collate([self.pairs[i] for i in take], self.pad_id)

    def all(self) -> list[dict[str, torch.Tensor]]:
        return [collate(self.pairs[i:i + self.batch_size], self.pad_id)
                for i in range(0, len(self.pairs), self.batch_size)]


class SpanCorruptionBatches:
    """index -> a batch of freshly corrupted windows of the corpus (a new noise pattern every time a window is
    drawn, deterministic in (seed, index))."""

    def __init__(self, windows: list[list[int]], sentinel_ids: list[int], eos_id: int, pad_id: int,
                 batch_size: int, seed: int, noise_density: float = 0.15, mean_span: float = 3.0):
        self.windows, self.sentinels, self.eos, self.pad = windows, sentinel_ids, eos_id, pad_id
        self.batch_size, self.seed, self.density, self.mean_span = batch_size, seed, noise_density, mean_span

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + index)
        pairs = []
        for _ in range(self.batch_size):
            w = self.windows[rng.randrange(len(self.windows))]
            a, b = span_corrupt(w, self.sentinels, rng, self.density, self.mean_span)
            pairs.append((a + [self.eos], b + [self.eos]))
        return collate(pairs, self.pad)


# ----------------------------------------------------------------------------------------------------------------
# Exact match
# ----------------------------------------------------------------------------------------------------------------
def exact_match(lm, rows: Sequence[dict[str, str]], batch_size: int = 64, **controls) -> tuple[float, list[str]]:
    """Share of rows whose generated text equals the target exactly (after stripping outer spaces)."""
    preds: list[str] = []
    controls = {"temperature": 0, "max_new_tokens": 32, **controls}
    for i in range(0, len(rows), batch_size):
        chunk = [r["input"] for r in rows[i:i + batch_size]]
        preds += [str(p) for p in lm.generate(chunk, **controls)]
    hits = sum(p.strip() == r["target"].strip() for p, r in zip(preds, rows))
    return hits / max(1, len(rows)), preds


# ----------------------------------------------------------------------------------------------------------------
# Configs and recipes
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Seq2SeqPretrainConfig(TrainConfig):
    data: list[str] = field(default_factory=lambda: ["builtin"], metadata={
        "help": "text sources: files, globs, directories, .jsonl, or builtin (the embedded corpus)"})
    out: str = field(default="", metadata={"help": "output directory (a Hugging Face T5 directory)"})
    extra_tokenizer_data: str = field(default="dates", metadata={
        "help": "also show the tokenizer trainer this task's texts ('dates', a .jsonl, or '' for none) so the "
                "fine-tuning task's characters are in the vocabulary"})
    vocab_size: int = field(default=1000, metadata={"help": "Unigram vocabulary size (sentinels added on top)"})
    num_sentinels: int = field(default=32, metadata={"help": "<extra_id_k> tokens for span corruption"})
    split_digits: bool = field(default=False, metadata={
        "help": "every digit its own token (numbers read digit by digit: dates, arithmetic)"})
    d_model: int = field(default=128, metadata={"help": "hidden size"})
    d_kv: int = field(default=32, metadata={"help": "size of each attention head"})
    d_ff: int = field(default=256, metadata={"help": "feed-forward size"})
    num_layers: int = field(default=2, metadata={"help": "encoder blocks (the decoder gets as many)"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    feed_forward_proj: str = field(default="gated-gelu", metadata={"help": "relu (T5 v1.0) or gated-gelu (v1.1)"})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "tied output head (v1.0) or separate (v1.1)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout rate"})
    window: int = field(default=64, metadata={"help": "tokens per pretraining window before corruption"})
    noise_density: float = field(default=0.15, metadata={"help": "share of tokens dropped in spans"})
    mean_span: float = field(default=3.0, metadata={"help": "mean length of a dropped span"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})

    def __post_init__(self):
        super().__post_init__()
        self.data = source_list(self.data)
        if not 0.0 < self.noise_density < 0.5:
            raise ConfigError(f"noise_density must be in (0, 0.5), got {self.noise_density}")
        if self.window < 8:
            raise ConfigError(f"window must be >= 8 tokens, got {self.window}")


def train_unigram(texts: list[str], vocab_size: int, num_sentinels: int, split_digits: bool = False):
    """A T5-shaped Unigram tokenizer trained on `texts`: <pad>=0, </s>=1, <unk>=2, sentinels last (<extra_id_0>
    is the last id, as in T5), and `$A </s>` as the post-processor. split_digits: every digit is its own token
    (a Digits pre-tokenizer after Metaspace), so numbers are read and written digit by digit."""
    from tokenizers import SentencePieceUnigramTokenizer, pre_tokenizers, processors

    tok = SentencePieceUnigramTokenizer()
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                            unk_token="<unk>", show_progress=False)
    tok.add_special_tokens([SENTINEL.format(k) for k in reversed(range(num_sentinels))])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return UnigramTokenizer.from_tokenizer_json(json.loads(tok.to_str()),
                                                {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                                                 "extra_ids": num_sentinels})


def _train_config(cfg: TrainConfig) -> TrainConfig:
    return TrainConfig(**{f: getattr(cfg, f) for f in TrainConfig.__dataclass_fields__})


def run_pretrain(cfg: Seq2SeqPretrainConfig, log=print) -> dict:
    """Train a tokenizer and a small T5 with span corruption; save an HF T5 directory. Returns the summary."""
    if not cfg.out:
        raise ConfigError("no out given: pass --out (or set `out` in the config)")
    docs, piece = [], []
    for text, last in read_documents(cfg.data):
        piece.append(text)
        if last:
            docs.append("".join(piece))
            piece = []
    extra = [f"{r['input']} {r['target']}" for r in read_pairs(cfg.extra_tokenizer_data, 500, seed=10_001)] \
        if cfg.extra_tokenizer_data else []
    tok = train_unigram(docs + extra, cfg.vocab_size, cfg.num_sentinels, cfg.split_digits)
    sentinels = [tok.token_to_id(SENTINEL.format(k)) for k in range(cfg.num_sentinels)]
    stream = [t for d in docs for t in tok.encode(d, add_special_tokens=False)]
    windows = [stream[i:i + cfg.window] for i in range(0, len(stream) - cfg.window + 1, cfg.window)]
    if len(windows) < 10:
        raise DataError(f"only {len(windows)} windows of {cfg.window} tokens in the data; give more text")
    rng = random.Random(cfg.seed)
    rng.shuffle(windows)
    n_val = max(1, len(windows) // 20)
    tconf = T5Config(vocab_size=tok.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                     num_layers=cfg.num_layers, num_heads=cfg.num_heads, feed_forward_proj=cfg.feed_forward_proj,
                     tie_word_embeddings=cfg.tie_word_embeddings, dropout_rate=cfg.dropout,
                     relative_attention_max_distance=cfg.window * 2, name=Path(cfg.out).name,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    lm = Seq2SeqLM(T5(tconf), tok, path=cfg.out)
    args = (sentinels, tok.eos_token_id, tok.pad_token_id, cfg.batch_size)
    data = SpanCorruptionBatches(windows[n_val:], *args, cfg.seed, cfg.noise_density, cfg.mean_span)
    val = [SpanCorruptionBatches(windows[:n_val], *args, cfg.seed + 1, cfg.noise_density, cfg.mean_span)(i)
           for i in range(4)]
    n_params = lm.model.num_params()
    log(f"{len(docs)} documents -> {len(stream)} tokens, {len(windows) - n_val} train / {n_val} val windows of "
        f"{cfg.window} | vocab {tok.vocab_size} | {n_params / 1e6:.2f}M parameters")
    res = train(lm.model, data, _train_config(cfg), val_data=val, loss_fn=seq2seq_loss, out_dir=cfg.out,
                save_model=lambda d: lm.save(d), log=log)
    summary = {"steps": res.step, "train_loss": res.train_loss, "val_loss": res.val_loss, "params": n_params,
               "tokens": len(stream)}
    atomic_write_json(Path(cfg.out) / "seq2seq_metrics.json", summary)
    log(f"span-corruption val loss {res.val_loss:.3f} -> {cfg.out}")
    return summary


@dataclass
class Seq2SeqFinetuneConfig(TrainConfig):
    model: str = field(default="", metadata={"help": "the T5 directory to start from"})
    out: str = field(default="", metadata={"help": "output directory (a Hugging Face T5 directory)"})
    data: str = field(default="dates", metadata={"help": "'dates' (built-in task) or a .jsonl of {input, target}"})
    train_examples: int = field(default=4000, metadata={"help": "with data=dates: training examples generated"})
    eval_examples: int = field(default=200, metadata={"help": "held-out examples for exact match"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters only (merged into the saved model)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator (scale = alpha / r)"})
    lora_targets: str = field(default="q,v", metadata={"help": "comma-separated linear layer names"})
    num_beams: int = field(default=1, metadata={"help": "beams when measuring exact match (1: greedy)"})
    max_new_tokens: int = field(default=24, metadata={"help": "longest generated answer"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})


def run_finetune(cfg: Seq2SeqFinetuneConfig, log=print) -> dict:
    """Fine-tune on (input, target) pairs; report exact match on held-out pairs before and after."""
    if not cfg.model or not cfg.out:
        raise ConfigError("seq2seq finetune needs --model (a T5 directory) and --out")
    lm = load(cfg.model)
    if not getattr(lm, "is_encoder_decoder", False):
        raise ConfigError(f"{cfg.model} is not an encoder-decoder (T5) model")
    if lm.tokenizer is None:
        raise ConfigError(f"{cfg.model} has no tokenizer.json")
    rows = read_pairs(cfg.data, cfg.train_examples + cfg.eval_examples, seed=cfg.seed)
    if cfg.data == "dates":
        train_rows, eval_rows = rows[:cfg.train_examples], rows[cfg.train_examples:]
        seen = {r["input"] for r in train_rows}
        eval_rows = [r for r in eval_rows if r["input"] not in seen]  # held out means never trained on
    else:
        n_eval = min(cfg.eval_examples, max(1, len(rows) // 10))
        train_rows, eval_rows = rows[n_eval:], rows[:n_eval]
    tok = lm.tokenizer
    pairs = [(tok.encode(r["input"]), tok.encode(r["target"])) for r in train_rows]
    gen = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams}
    before, _ = exact_match(lm, eval_rows, **gen)
    lm.model.train()
    if cfg.lora:
        lora.add_lora(lm.model, [t for t in cfg.lora_targets.split(",") if t], r=cfg.lora_r, alpha=cfg.lora_alpha)
        log(lora.trainable_report(lm.model))
    data = PairBatches(pairs, cfg.batch_size, lm.config.pad_token_id, cfg.seed)
    val = PairBatches([(tok.encode(r["input"]), tok.encode(r["target"])) for r in eval_rows], cfg.batch_size,
                      lm.config.pad_token_id, cfg.seed).all()
    res = train(lm.model, data, _train_config(cfg), val_data=val, loss_fn=seq2seq_loss, out_dir=cfg.out,
                save_model=None if cfg.lora else (lambda d: lm.save(d)), log=log)
    if cfg.lora:
        lora.merge_and_unload(lm.model)
        lm.save(cfg.out)
    lm.model.eval()
    after, preds = exact_match(lm, eval_rows, **gen)
    summary = {"steps": res.step, "train_loss": res.train_loss, "val_loss": res.val_loss, "lora": cfg.lora,
               "exact_match_before": before, "exact_match": after, "eval_examples": len(eval_rows),
               "num_beams": cfg.num_beams,
               "examples": [{"input": r["input"], "target": r["target"], "prediction": p}
                            for r, p in list(zip(eval_rows, preds))[:5]]}
    atomic_write_json(Path(cfg.out) / "seq2seq_metrics.json", summary)
    log(f"exact match on {len(eval_rows)} held-out examples: {before:.1%} before, {after:.1%} after -> {cfg.out}")
    return summary


def run_eval(model: str, data: str = "dates", n: int = 200, seed: int = 99, num_beams: int = 1,
             max_new_tokens: int = 24) -> dict:
    """Exact match of a saved model on `n` examples (dates: generated with `seed`; default seed differs from
    training's) or on a .jsonl file."""
    lm = load(model)
    if not getattr(lm, "is_encoder_decoder", False):
        raise ConfigError(f"{model} is not an encoder-decoder (T5) model")
    rows = read_pairs(data, n, seed)
    em, preds = exact_match(lm, rows, num_beams=num_beams, max_new_tokens=max_new_tokens)
    return {"exact_match": em, "examples": len(rows), "num_beams": num_beams,
            "wrong": [{"input": r["input"], "target": r["target"], "prediction": p}
                      for r, p in zip(rows, preds) if p.strip() != r["target"].strip()][:5]}
