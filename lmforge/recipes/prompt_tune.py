"""Recipe: prompt tuning — learn a soft prompt for a task, every weight of the model frozen.

    lmforge finetune prompt-tune runs/demo --data instruction-data.json --out runs/pt --num-virtual-tokens 20

Same data, masks and evaluation as SFT (`finetune.sft`); only the `num_virtual_tokens x n_embd` prompt trains
(`lmforge.finetune.prompt_tuning`). The output directory is a PEFT prompt-tuning adapter (adapter_config.json +
adapter_model.safetensors); load it onto the base with `prompt_tuning.load_prompt(model, dir, name)` and switch
tasks with `set_prompt(name)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.finetune import common
from lmforge.finetune.losses import response_loss
from lmforge.finetune.prompt_tuning import add_prompt_tuning, save_prompt
from lmforge.lm import LM
from lmforge.recipes.sft import answer_and_score, chat_template, load_splits, sft_batches, SFTConfig
from lmforge.training.loop import train
from lmforge.utils import atomic_write_json


@dataclass
class PromptTuneConfig(SFTConfig):
    num_virtual_tokens: int = field(default=20, metadata={"help": "length of the soft prompt"})
    init_text: str = field(default="", metadata={
        "help": "initialize the soft prompt from the embeddings of this text (default: random)"})
    lr: float = field(default=3e-2, metadata={"help": "peak learning rate (soft prompts like large ones)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})

    def __post_init__(self):
        super().__post_init__()
        if self.lora_r:
            raise ConfigError("prompt tuning trains a soft prompt only; drop --lora-r")
        if self.adapter or self.replay_data or self.forgetting_data:
            raise ConfigError("prompt tuning trains a soft prompt only; --adapter, --replay-data and "
                              "--forgetting-data are options of `finetune sft`")


def run_prompt_tune(cfg: PromptTuneConfig, log=print) -> dict:
    cfg.check_paths()
    lm = common.load_base(cfg)
    out = Path(cfg.out)
    parts = load_splits(cfg)
    template = chat_template(cfg, lm)
    # the virtual tokens take context positions: leave room for them
    room = lm.model.config.block_size - cfg.num_virtual_tokens
    if room < 2:
        raise ConfigError(f"num_virtual_tokens={cfg.num_virtual_tokens} leaves no room in a context of "
                          f"{lm.model.config.block_size} tokens")
    if cfg.max_length > room:
        log(f"note: max_length {cfg.max_length} is cut to {room}: the model's context of "
            f"{lm.model.config.block_size} tokens minus {cfg.num_virtual_tokens} virtual tokens")
    cfg = dataclasses.replace(cfg, max_length=min(cfg.max_length or room, room))
    batches, val = sft_batches(cfg, lm, parts, template, log)
    init = lm.tokenizer.encode(cfg.init_text) if cfg.init_text else None
    model = add_prompt_tuning(lm.model, cfg.num_virtual_tokens, init)
    tuned = LM(model, lm.tokenizer, lm.config, lm.generation_config, lm.chat_template)
    log(f"soft prompt: {cfg.num_virtual_tokens} virtual tokens x {lm.config.n_embd} = "
        f"{cfg.num_virtual_tokens * lm.config.n_embd:,} trainable parameters (base frozen)")

    def save(d: Path) -> None:
        save_prompt(model, d, base_model_name_or_path=str(Path(cfg.model).resolve()), init_text=cfg.init_text or None)
        atomic_write_json(Path(d) / "finetune_config.json", dataclasses.asdict(cfg))

    metrics: dict[str, Any] = {}
    if cfg.rouge_before:
        model.set_prompt(None)
        _, metrics["rouge_l_before"] = answer_and_score(tuned, parts["test"], cfg, template)
        model.set_prompt("default")
    result = train(model, batches, cfg.train_config(len(batches)), val_data=val, loss_fn=response_loss,
                   out_dir=out, save_model=save, log=log)
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    metrics.update(val_loss_before=vals[0] if vals else None, val_loss_after=result.val_loss, steps=result.step)
    answers, metrics["rouge_l"] = answer_and_score(tuned, parts["test"], cfg, template)
    if answers:
        atomic_write_json(out / "test_responses.json", answers)
    atomic_write_json(out / "metrics.json", metrics)
    log(f"soft prompt (PEFT prompt-tuning layout): {out}")
    return metrics
