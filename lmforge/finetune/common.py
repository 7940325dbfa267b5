"""What every fine-tuning recipe shares: its config fields, loading the base, LoRA, the loop's settings, saving.

`FinetuneConfig` extends the training loop's `TrainConfig` (so `--lr`, `--batch-size`, `--max-steps`,
`--eval-every`... are the loop's own fields) with the model, data and output paths, `epochs`, and the LoRA
settings. Recipes subclass it with their own fields; the same names work in YAML, on the command line and in
Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch.nn as nn

from lmforge.errors import ConfigError
from lmforge.finetune import adapters, lora
import lmforge  # lmforge.load at call time: the loader imports finetune (adapters), so not `from lmforge.loader`
from lmforge.training.loop import TrainConfig
from lmforge.utils import atomic_write_json, check_output, check_seed


@dataclass
class FinetuneConfig(TrainConfig):
    model: str = field(default="", metadata={"help": "base model: an lmforge or Hugging Face model directory"})
    data: str = field(default="", metadata={"help": "training data file (.json, .jsonl, .tsv, .csv)"})
    out: str = field(default="", metadata={"help": "output directory"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into `out` even if it already holds a model or other files (they are replaced)"})
    val_data: str = field(default="", metadata={"help": "validation file (default: split off `data`)"})
    test_data: str = field(default="", metadata={"help": "test file (default: split off `data`)"})
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2], metadata={
        "help": "train,val,test fractions used when no val/test files are given"})
    split_seed: int = field(default=123, metadata={"help": "seed of the train/val/test shuffle"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training data (sets max_steps)"})
    max_length: int = field(default=0, metadata={"help": "longest sequence in tokens (0: the model's block_size)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: no LoRA, train the weights themselves)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha/r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "layers to adapt: names like q_proj,v_proj (HF names such as c_attn work too) or all-linear"})
    merge: bool = field(default=False, metadata={"help": "with LoRA: write a merged model directory, not an adapter"})
    quantize: str = field(default="", metadata={
        "help": "QLoRA: quantize the frozen base (nf4, int4 or int8) before adding LoRA adapters"})
    quant_group_size: int = field(default=32, metadata={"help": "QLoRA: group size of nf4/int4 quantization"})

    DECIDES: ClassVar[dict[str, str]] = {"epochs": "max_steps"}  # for argconf.from_cli: which field sets which

    def __post_init__(self):
        super().__post_init__()

        check_seed(self.seed)
        check_seed(self.split_seed, "split_seed")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.quantize and self.lora_r <= 0:
            raise ConfigError(f"quantize={self.quantize!r} trains LoRA adapters over a frozen quantized base (QLoRA); "
                              f"set --lora-r")
        if self.quantize and self.merge:
            raise ConfigError("--merge cannot fold adapters into a quantized base; merge the saved adapter into the "
                              "float model instead")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t for t in self.lora_targets.split(",") if t]

    def check_paths(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"no {name} given: pass --{name} (or set `{name}` in the config)")

        check_output(self.out, overwrite=self.overwrite)  # never replace a model the user did not ask to

    def train_config(self, steps_per_epoch: int) -> TrainConfig:
        """The loop's settings; `epochs` (if set) decides max_steps from the number of batches per epoch."""
        tc = TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})
        if self.epochs is not None:
            steps = math.ceil(self.epochs * steps_per_epoch / self.grad_accum_steps)
            tc = dataclasses.replace(tc, max_steps=max(1, steps))
        return tc


def load_base(cfg: FinetuneConfig):
    """The base model as an `LM`, in fp32 (training on CPU) and in training mode."""
    lm = lmforge.load(cfg.model, dtype="float32")
    if lm.tokenizer is None:
        raise ConfigError(f"{cfg.model}: the model directory has no tokenizer; fine-tuning needs one")
    return lm


def pad_id(tok) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    return 0


def max_length(cfg: FinetuneConfig, model: nn.Module) -> int:
    block = model.config.block_size
    if cfg.max_length and cfg.max_length > block:
        raise ConfigError(f"max_length {cfg.max_length} is longer than the model's context ({block})")
    return cfg.max_length or block


def maybe_lora(model: nn.Module, cfg: FinetuneConfig, log: Callable[[str], None] = print) -> bool:
    """Add LoRA adapters when cfg.lora_r > 0 (base frozen); returns whether it did."""
    if cfg.lora_r <= 0:
        return False

    if cfg.quantize:  # QLoRA (Dettmers et al. 2023): the frozen base in 4 bits, adapters and activations in fp32
        from lmforge.compress.quantize import quantize_model

        quantize_model(model, cfg.quantize, group_size=cfg.quant_group_size, embeddings="keep", fallback="int8",
                       progress=False)
        log(f"base quantized to {cfg.quantize} (group {cfg.quant_group_size}); LoRA trains on top (QLoRA)")
    lora.add_lora(model, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    log(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} on {','.join(cfg.lora_targets)}: {lora.trainable_report(model)}")
    return True


def lm_saver(lm, cfg: FinetuneConfig, uses_lora: bool, uses_adapters: bool = False) -> Callable[[Path], None]:
    """What the loop writes at each checkpoint: the PEFT adapter (LoRA), the bottleneck adapter directory
    (`finetune.adapters`), or the whole model directory. Adapters name their base by its absolute path."""
    def save(d: Path) -> None:
        if uses_lora:
            lora.save_peft(lm.model, d, base_model_name_or_path=str(Path(cfg.model).resolve()))
        elif uses_adapters:
            adapters.save_adapter(lm.model, d, base_model_name_or_path=str(Path(cfg.model).resolve()))
        else:
            lm.save(d)
        atomic_write_json(Path(d) / "finetune_config.json", dataclasses.asdict(cfg))

    return save


def finish(lm, cfg: FinetuneConfig, uses_lora: bool, log: Callable[[str], None] = print,
           uses_adapters: bool = False) -> Path:
    """After training: with LoRA and `merge`, replace the adapter by a merged model directory."""
    out = Path(cfg.out)
    if uses_lora and cfg.merge:
        lora.merge_and_unload(lm.model)
        lm.save(out)
        for name in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS):
            (out / name).unlink(missing_ok=True)
        log(f"merged the adapter into the base: model directory {out}")
    elif uses_lora:
        log(f"LoRA adapter (PEFT layout): {out}")
    elif uses_adapters:
        log(f"bottleneck adapter: {out} (lmforge.load({str(out)!r}) loads the base it names and inserts it)")
    else:
        log(f"model directory: {out}")
    return out


def eval_batches(batches: list[Any]) -> list[Any] | None:
    return batches or None
