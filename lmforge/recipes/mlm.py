"""Recipe: pretrain a small BERT-style encoder with masked-language modelling (lmforge.tasks.mlm).

    lmforge pretrain-mlm --config configs/pretrain/mlm-demo.yaml --out runs/mlm-demo
    lmforge fill-mask runs/mlm-demo "The [MASK] statement repeats a block of code."

Steps: read the documents (the embedded corpus by default), train a WordPiece vocabulary on them with the
`tokenizers` library (or reuse a model directory's tokenizer), cut each document into [CLS] ... [SEP] sequences,
build a randomly initialised encoder with a tied MLM head, train it with the one loop (`loss_fn=mlm_loss`, masks
drawn afresh for every batch), and write a BertForMaskedLM directory that transformers' fill-mask pipeline
loads as it is, plus metrics.jsonl, loss.png and the masked-token accuracy on held-out sequences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.encoder_lm import EncoderLM
from lmforge.errors import ConfigError
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.tasks.common import save_task_model, task_model
from lmforge.tasks.mlm import chunk_documents, masked_accuracy, mlm_loss, MLMBatches
from lmforge.tokenizers.wordpiece import WordPieceTokenizer
from lmforge.training.data import read_documents, source_list
from lmforge.training.loop import train, TrainConfig
from lmforge.utils import atomic_write_json, check_output


@dataclass
class MLMConfig(TrainConfig):
    data: list[str] = field(default_factory=lambda: ["builtin"], metadata={
        "help": "text sources: files, globs, directories, .jsonl, or builtin (the embedded corpus)"})
    out: str = field(default="", metadata={"help": "output directory (a BertForMaskedLM directory)"})
    tokenizer: str = field(default="train", metadata={
        "help": "train (a new WordPiece vocabulary from the data) or a model directory whose tokenizer to use"})
    vocab_size: int = field(default=4096, metadata={"help": "WordPiece vocabulary size when training one"})
    n_layer: int = field(default=4, metadata={"help": "encoder blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    n_embd: int = field(default=128, metadata={"help": "hidden size"})
    max_length: int = field(default=128, metadata={"help": "tokens per sequence, [CLS] and [SEP] included"})
    mlm_probability: float = field(default=0.15, metadata={"help": "share of tokens chosen for prediction"})
    whole_word_mask: bool = field(default=False, metadata={"help": "choose whole words, hide all their pieces"})
    dropout: float = field(default=0.1, metadata={"help": "hidden and attention dropout"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the sequences held out for validation"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (RoBERTa's 0.98 for small-batch MLM)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into `out` even if it already holds a model or other files (they are replaced)"})

    def __post_init__(self):
        super().__post_init__()
        self.data = source_list(self.data)
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.vocab_size < 128:
            raise ConfigError(f"vocab_size={self.vocab_size} is too small for WordPiece (use >= 128)")


def train_wordpiece(documents: list[str], vocab_size: int):
    """A lower-casing BERT WordPiece vocabulary trained on `documents` (the `tokenizers` library's trainer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(documents, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                 min_frequency=2, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    return WordPieceTokenizer.from_tokenizer_json(json.loads(tok.to_str()))


def run_mlm(cfg: MLMConfig, log=print) -> dict:
    """Pretrain and save; returns {"val_loss", "val_masked_accuracy", "steps", "params"}."""
    import torch

    if not cfg.out:
        raise ConfigError("no out given: pass --out (or set `out` in the config)")
    check_output(cfg.out, overwrite=cfg.overwrite)  # never replace a model the user did not ask to
    docs, piece = [], []
    for text, last in read_documents(cfg.data):
        piece.append(text)
        if last:
            docs.append("".join(piece))
            piece = []
    if cfg.tokenizer == "train":
        tok = train_wordpiece(docs, cfg.vocab_size)
    else:
        from lmforge.formats.bert import load_encoder_tokenizer

        tok = load_encoder_tokenizer(Path(cfg.tokenizer), None)
        if tok is None:
            raise ConfigError(f"{cfg.tokenizer}: no tokenizer.json or vocab.txt there")
    if tok.mask_token_id is None:
        raise ConfigError("the tokenizer has no [MASK] token; masked-LM training needs one")
    chunks = chunk_documents(tok, docs, cfg.max_length)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = max(1, int(len(chunks) * cfg.val_fraction))
    val_chunks, train_chunks = [chunks[i] for i in order[:n_val]], [chunks[i] for i in order[n_val:]]
    econf = EncoderConfig(vocab_size=tok.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          max_position_embeddings=cfg.max_length, pad_token_id=tok.pad_token_id,
                          dropout=cfg.dropout, attn_dropout=cfg.dropout, pooler=False,  # BertForMaskedLM has none
                          name=Path(cfg.out).name)
    torch.manual_seed(cfg.seed)
    lm = EncoderLM(Encoder(econf), tok, econf, max_seq_length=cfg.max_length, path=cfg.out)
    model = task_model(lm, "mlm", require_head=False)
    data = MLMBatches(train_chunks, tok, cfg.batch_size, cfg.seed, cfg.mlm_probability, cfg.whole_word_mask)
    val = MLMBatches(val_chunks, tok, cfg.batch_size, cfg.seed + 1, cfg.mlm_probability, cfg.whole_word_mask,
                     shuffle=False).all()
    n_params = sum(p.numel() for p in model.parameters())  # each tensor once: the tied decoder is wte
    log(f"{len(docs)} documents -> {len(train_chunks)} train / {len(val_chunks)} val sequences of <= "
        f"{cfg.max_length} tokens | vocab {tok.vocab_size} | {n_params / 1e6:.2f}M parameters")
    tc = TrainConfig(**{f: getattr(cfg, f) for f in TrainConfig.__dataclass_fields__})
    res = train(model, data, tc, val_data=val, loss_fn=mlm_loss, out_dir=cfg.out,
                save_model=lambda d: save_task_model(lm, model, d), log=log)
    acc = masked_accuracy(model, val)
    summary = {"steps": res.step, "train_loss": res.train_loss, "val_loss": res.val_loss,
               "val_masked_accuracy": acc, "params": n_params, "train_sequences": len(train_chunks)}
    atomic_write_json(Path(cfg.out) / "mlm_metrics.json", summary)
    log(f"val loss {res.val_loss:.3f}, masked-token accuracy {acc:.1%} -> {cfg.out}")
    return summary
