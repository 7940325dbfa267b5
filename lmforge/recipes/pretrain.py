"""Pretraining recipe: text -> tokenizer -> token shards -> model -> the training loop -> a model directory.

    from lmforge.recipes.pretrain import PretrainConfig, run_pretrain
    lm = run_pretrain(PretrainConfig(data=["builtin"], out="runs/demo", max_steps=300))
    lm.generate("The for statement", max_new_tokens=30)

The same fields are YAML keys (`configs/pretrain/*.yaml`) and CLI flags (`lmforge pretrain --max-steps 300`).
The output directory is an lmforge model directory (config.json, model.safetensors, tokenizer.json,
generation_config.json) plus the run's metrics.jsonl, loss.png, pretrain_config.json and train_state/ for
`--resume`. Tokens are stored next to it in `<out>.shards/` (reused when the run is resumed).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from lmforge.errors import ConfigError, DataError
from lmforge.generation.config import GenerationConfig
from lmforge.lm import LM
from lmforge.loader import load as load_model
from lmforge.models.config import ModelConfig
from lmforge.models.decoder import Transformer
from lmforge.tokenizers.basic import CharTokenizer
from lmforge.tokenizers.bpe import Tokenizer
from lmforge.training.data import (Batches, BUILTIN, builtin_documents, PackedBatches, read_documents, resolve_sources,
                                   SlidingWindowDataset, source_list, sources_size, tokenize_to_shards, TokenShards,
                                   train_val_split)
from lmforge.training.loop import read_train_state, setup_distributed, train, TrainConfig
from lmforge.utils import atomic_write_json, check_output, check_seed, parse_device


@dataclass
class PretrainConfig(TrainConfig):
    # the recipe asks for the process-wide speed settings the library leaves off (lmforge.training.loop.TrainConfig)
    retain_memory: bool = field(default=True, metadata={
        "help": "CPU: keep freed memory in the process between steps (glibc mallopt while the run lasts)"})
    tf32: bool = field(default=True, metadata={"help": "CUDA: fp32 matmuls may use TF32 tensor cores"})
    # --- data ---
    data: list[str] = field(default_factory=lambda: ["builtin"], metadata={
        "help": "text files, globs, directories, JSONL files or 'builtin' (the embedded corpus); $VARS expand"})
    text_field: str = field(default="text", metadata={"help": "JSON/JSONL field that holds the text"})
    val_fraction: float = field(default=0.1, metadata={"help": "last fraction of the tokens kept for validation"})
    sampling: Literal["packed", "sliding"] = field(default="packed", metadata={
        "help": "packed: random windows of the token stream; sliding: the course's windows every `stride` tokens"})
    stride: int | None = field(default=None, metadata={"help": "sliding windows: step between windows (default: "
                                                               "block_size)"})
    epochs: float | None = field(default=None, metadata={"help": "if set, max_steps = this many passes over the "
                                                                 "training tokens"})
    shards_dir: str = field(default="", metadata={"help": "where token shards go (default: <out>.shards)"})
    num_workers: int = field(default=0, metadata={"help": "tokenization worker processes (0: in-process)"})
    # --- tokenizer ---
    tokenizer: str = field(default="train", metadata={
        "help": "'train' (a byte-level BPE on the data), 'char' (one token per character of the data, as nanoGPT's "
                "shakespeare_char), a tokenizer.json / model directory, or a directory with GPT-2's encoder.json + "
                "vocab.bpe"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size when the tokenizer is trained"})
    tokenizer_pattern: str = field(default="gpt2", metadata={"help": "pre-tokenization regex: gpt2, gpt4 or a regex"})
    # --- model ---
    model: str = field(default="gpt-tiny", metadata={"help": "a ModelConfig preset (gpt-tiny, llama-tiny, gpt2, ...)"})
    block_size: int | None = field(default=None, metadata={"help": "context length (overrides the preset)"})
    n_layer: int | None = field(default=None, metadata={"help": "transformer blocks (overrides the preset)"})
    n_head: int | None = field(default=None, metadata={"help": "attention heads (overrides the preset)"})
    n_kv_head: int | None = field(default=None, metadata={"help": "key/value heads (overrides the preset)"})
    n_embd: int | None = field(default=None, metadata={"help": "model width (overrides the preset)"})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width (overrides the preset)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout rate (overrides the preset)"})
    qkv_bias: bool | None = field(default=None, metadata={"help": "bias on q/k/v projections (overrides the preset)"})
    tie_word_embeddings: bool | None = field(default=None, metadata={"help": "share lm_head with the embedding"})
    init: Literal["gpt2", "torch"] = field(default="gpt2", metadata={
        "help": "gpt2: N(0, 0.02) with scaled residual projections; torch: PyTorch's layer defaults (embeddings "
                "N(0, 1), Kaiming-uniform linears), as the course's GPTModel"})
    # --- run ---
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default, one per core)"})
    out: str = field(default="", metadata={"help": "output model directory"})
    resume: bool = field(default=False, metadata={"help": "continue the run in `out` from its train_state/"})
    overwrite: bool = field(default=False, metadata={
        "help": "start a fresh run in `out` even if it already holds a model (which is replaced)"})

    DECIDES: ClassVar[dict[str, str]] = {"epochs": "max_steps"}  # for argconf.from_cli: which field sets which

    def __post_init__(self):
        super().__post_init__()

        check_seed(self.seed)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.sampling not in ("packed", "sliding"):
            raise ConfigError(f"sampling must be packed or sliding, got {self.sampling!r}")
        if self.init not in ("gpt2", "torch"):
            raise ConfigError(f"init must be gpt2 or torch, got {self.init!r}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        self.data = source_list(self.data)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def model_overrides(self) -> dict:
        names = ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "dropout",
                 "qkv_bias", "tie_word_embeddings")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


_UNSET_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def expand_path(p: str) -> str:
    """Expand ~ and $VARS; a variable that is not set is an error naming it (not a confusing missing file)."""
    out = os.path.expanduser(os.path.expandvars(p))
    m = _UNSET_VAR.search(out)
    if m:
        raise ConfigError(f"environment variable {m.group(1)} is not set (used in {p!r})")
    return out


def reset_to_torch_defaults(model) -> None:
    """Re-initialize every layer with its own `reset_parameters()` (PyTorch's defaults), embeddings last so a tied
    lm_head keeps the embedding's N(0, 1) values. Models written without custom init (the course's) start here."""
    import torch.nn as nn

    mods = [m for m in model.modules() if m is not model and hasattr(m, "reset_parameters")]
    for m in sorted(mods, key=lambda m: isinstance(m, nn.Embedding)):
        m.reset_parameters()


def _training_texts(cfg: PretrainConfig, sources: list[str]) -> list:
    """What a tokenizer trainer reads: documents as strings, plain text files as Paths (the trainer reads them)."""
    texts: list = []
    for src in resolve_sources(sources):
        if src == BUILTIN:
            texts.extend(builtin_documents())
        elif src.suffix in (".jsonl", ".json"):
            texts.extend(t for t, _ in read_documents([src], cfg.text_field))
        else:
            texts.append(src)
    return texts


def build_tokenizer(cfg: PretrainConfig, sources: list[str]):
    """Train a BPE on the data, take the data's characters as the vocabulary (``char``), or load a tokenizer
    (tokenizer.json, a model directory, or GPT-2's two files).

    ``char`` is nanoGPT's shakespeare_char vocabulary: every distinct character of the data, sorted, then
    `<|endoftext|>` (which separates documents in the token stream) and `<|unk|>`. `vocab_size` is ignored."""
    if cfg.tokenizer == "train":
        texts = _training_texts(cfg, sources)
        return Tokenizer.train(texts, cfg.vocab_size, pattern=cfg.tokenizer_pattern, progress=cfg.progress)
    if cfg.tokenizer == "char":
        return CharTokenizer.train(_training_texts(cfg, sources))
    path = Path(expand_path(cfg.tokenizer))
    if path.is_dir() and (path / "encoder.json").exists() and (path / "vocab.bpe").exists():
        return Tokenizer.from_gpt2_files(path / "encoder.json", path / "vocab.bpe")
    return Tokenizer.load(path)


def run_pretrain(cfg: PretrainConfig):
    """Run the recipe; returns the trained `LM` (also saved in `cfg.out`)."""
    if not cfg.out:
        raise ConfigError("no output directory: pass --out DIR (or set `out` in the config)")
    out = check_output(expand_path(cfg.out), overwrite=cfg.overwrite, resume=cfg.resume)
    sources = [expand_path(s) for s in cfg.data]
    shards_dir = Path(expand_path(cfg.shards_dir)) if cfg.shards_dir else out.with_name(out.name + ".shards")

    # 1. tokenizer (a resumed run keeps the one it was trained with)
    if cfg.resume:
        read_train_state(out)  # a clear error if there is nothing to resume
        tokenizer = Tokenizer.load(out)
    else:
        tokenizer = build_tokenizer(cfg, sources)

    # 2. token shards (reused on resume; under torchrun rank 0 writes them while the others wait)
    dist_info = setup_distributed(parse_device(cfg.device))
    if not (cfg.resume and (shards_dir / "manifest.json").exists()) and dist_info.is_main:
        tokenize_to_shards(read_documents(sources, cfg.text_field), tokenizer, shards_dir,
                           num_workers=cfg.num_workers, progress=cfg.progress, total_bytes=sources_size(sources),
                           metadata={"sources": sources})
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    shards = TokenShards(shards_dir)
    train_tokens, val_tokens = train_val_split(shards, cfg.val_fraction)

    # 3. model
    mcfg = ModelConfig.from_name(cfg.model, **{**cfg.model_overrides(), "vocab_size": tokenizer.vocab_size})
    T = mcfg.block_size
    if len(val_tokens) < T + 1:
        raise DataError(f"the validation split has {len(val_tokens)} tokens, fewer than one window of block_size="
                        f"{T} (+1); use more data, a larger val_fraction or a smaller block_size")
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg)
    if cfg.init == "torch":
        reset_to_torch_defaults(model)

    # 4. batches
    if cfg.sampling == "sliding":
        train_ds = SlidingWindowDataset(train_tokens, T, cfg.stride or T)
        train_batches = Batches(train_ds, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed)
        steps_per_epoch = len(train_batches) / cfg.grad_accum_steps
    else:
        train_batches = PackedBatches(train_tokens, cfg.batch_size, T, seed=cfg.seed)
        steps_per_epoch = len(train_tokens) / (cfg.batch_size * T * cfg.grad_accum_steps)
    val_batches = Batches(SlidingWindowDataset(val_tokens, T, T), cfg.batch_size)
    tcfg = cfg.train_config()
    if cfg.epochs is not None:
        tcfg = dataclasses.replace(tcfg, max_steps=max(1, math.ceil(cfg.epochs * steps_per_epoch)))

    # 5. train; every checkpoint writes a complete model directory
    gen = GenerationConfig(max_new_tokens=128, temperature=0.8, top_k=50, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id)

    def save_model(d: Path) -> None:
        LM(model, tokenizer, mcfg, gen).save(d)
        atomic_write_json(d / "pretrain_config.json", dataclasses.asdict(cfg))

    say = print if dist_info.is_main else (lambda *a, **k: None)
    say(f"model: {mcfg.name} {model.num_params() / 1e6:.2f}M params | tokens: {len(train_tokens):,} train, "
          f"{len(val_tokens):,} val | {tcfg.max_steps} steps of {cfg.batch_size}x{T}x{cfg.grad_accum_steps} -> {out}")
    result = train(model, train_batches, tcfg, val_data=val_batches, out_dir=out, save_model=save_model,
                   tokenizer=tokenizer, resume=cfg.resume)
    if result.train_loss is not None and result.val_loss is not None:
        say(f"done: step {result.step}, train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f} "
            f"(perplexity {math.exp(result.val_loss):.2f})")
    say(f"model directory: {out}   (try: lmforge generate {out} \"...\")")
    return load_model(out)
