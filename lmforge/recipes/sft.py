"""Recipe: supervised instruction fine-tuning (SFT) on Alpaca-format or chat-messages data.

    lmforge finetune sft runs/demo --data instruction-data.json --out runs/sft --epochs 2
    lmforge finetune sft runs/demo --data chats.jsonl --out runs/sft-lora --lora-r 8 --lora-targets all-linear
    lmforge finetune sft runs/demo --data instruction-data.json --out runs/sft-bn --adapter bottleneck --adapter-size 16
    lmforge finetune sft runs/demo --data instruction-data.json --out runs/sft --forgetting-data corpus.txt \
        --replay-data corpus.txt --replay-ratio 0.1

The model learns to continue a prompt (Alpaca template or chat template) with the response; the loss counts
response tokens only (`finetune.data`). After training it writes the course's evaluation file: the test split
with the model's answers (`test_responses.json`, fields instruction/input/output/model_response) and scores
them against the expected outputs with ROUGE-L (`finetune.metrics`). Held-out loss is logged by the loop.

What it trains: every weight (default), LoRA adapters (`--lora-r`, `finetune.lora`), or bottleneck adapters
(`--adapter bottleneck`, `finetune.adapters`: written as their own small directory naming the base; they cannot
be merged).

Forgetting. Fine-tuning on instructions moves the weights away from what pretraining found, and the model gets
worse at plain text ("catastrophic forgetting"). `--forgetting-data` (the pretraining text, or `builtin`) reports
the perplexity of its held-out tail (the last `heldout_fraction`, pretraining's validation split) before and after
training, so the cost is measured, not guessed. `--replay-data` fights it: a `replay_ratio` fraction of the
batches become plain next-token batches drawn from the rest of that text (`finetune.data.ReplayMix`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, DataError
from lmforge.finetune import adapters, common, data as D, lora
from lmforge.finetune.losses import response_loss
from lmforge.finetune.metrics import rouge_l
from lmforge.tokenizers.chat_template import end_of_turn_markers
from lmforge.training.data import PackedBatches, train_val_split
from lmforge.training.eval import perplexity
from lmforge.training.loop import train
from lmforge.utils import atomic_write_json


@dataclass
class SFTConfig(common.FinetuneConfig):
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.1], metadata={
        "help": "train,val,test fractions used when no val/test files are given (the course's 85/5/10)"})
    chat_template: str = field(default="", metadata={
        "help": "chat data: a Jinja template file (default: the model's own template, else ChatML)"})
    packing: bool = field(default=False, metadata={"help": "pack examples into full rows instead of padding"})
    group_by_length: bool = field(default=True, metadata={"help": "batch examples of similar length (less padding)"})
    max_new_tokens: int = field(default=128, metadata={"help": "answer length when generating for the test split"})
    eval_generate: int = field(default=-1, metadata={
        "help": "test records to answer and score with ROUGE-L (-1: all, 0: none)"})
    rouge_before: bool = field(default=False, metadata={"help": "also answer the test split before training"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    max_steps: int = field(default=500, metadata={"help": "optimizer steps (unless --epochs is given)"})
    eval_at_start: bool = field(default=True, metadata={"help": "held-out loss before the first step"})
    adapter: str = field(default="", metadata={
        "help": "bottleneck: train bottleneck adapters (Houlsby et al. 2019) in every block, base frozen "
                "('': none; LoRA is --lora-r)"})
    adapter_size: int = field(default=16, metadata={"help": "bottleneck adapters: the bottleneck width m"})
    adapter_where: list[str] = field(default_factory=lambda: ["attn", "mlp"], metadata={
        "help": "bottleneck adapters: after the attention and/or the MLP sub-layer (attn,mlp)"})
    adapter_activation: str = field(default="gelu", metadata={
        "help": "bottleneck adapters: the nonlinearity (gelu, relu, silu, tanh)"})
    forgetting_data: str = field(default="", metadata={
        "help": "pretraining text (file(s) or builtin): report its held-out perplexity before and after training"})
    forgetting_tokens: int = field(default=16384, metadata={
        "help": "forgetting check: score at most this many held-out tokens"})
    heldout_fraction: float = field(default=0.1, metadata={
        "help": "the last fraction of --forgetting-data/--replay-data text held out (pretrain's val_fraction): "
                "perplexity is measured there, replay never draws from it"})
    replay_data: str = field(default="", metadata={
        "help": "pretraining text (file(s) or builtin) mixed into training as plain LM batches (against forgetting)"})
    replay_ratio: float = field(default=0.1, metadata={
        "help": "with --replay-data: the fraction of batches that are pretraining-text batches"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.adapter_where, str):
            self.adapter_where = [w for w in self.adapter_where.split(",") if w]
        if self.adapter not in ("", "bottleneck"):
            raise ConfigError(f"adapter must be bottleneck (or empty for none), got {self.adapter!r}; "
                              f"LoRA is --lora-r")
        if self.adapter:
            if self.lora_r:
                raise ConfigError("choose one: --adapter bottleneck or LoRA (--lora-r), not both")
            if self.merge:
                raise ConfigError("bottleneck adapters cannot be merged into the weights (a nonlinearity sits "
                                  "between their two projections); drop --merge")
            adapters.parse_sites(self.adapter_where)
            if self.adapter_size <= 0:
                raise ConfigError(f"adapter_size must be > 0, got {self.adapter_size}")
            if self.adapter_activation not in adapters.ACTIVATIONS:
                raise ConfigError(f"adapter_activation must be one of {', '.join(adapters.ACTIVATIONS)}, got "
                                  f"{self.adapter_activation!r}")
        if not 0.0 < self.replay_ratio < 1.0:
            raise ConfigError(f"replay_ratio must be between 0 and 1 (exclusive), got {self.replay_ratio}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction must be between 0 and 1 (exclusive), got {self.heldout_fraction}")
        if self.forgetting_tokens < 2:
            raise ConfigError(f"forgetting_tokens must be >= 2, got {self.forgetting_tokens}")


RECORD_FORMATS = ("a .json list (or .jsonl lines) of Alpaca records (instruction, input, output), chat records "
                  "(messages) or, for DPO, preference records (instruction, input, chosen, rejected)")


def _read(path: str) -> list[dict]:
    """Records of an instruction/chat/preference file; a TSV, CSV or text file is named as the wrong format."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".jsonl") and Path(path).is_file():
        raise DataError(f"{path}: this recipe reads {RECORD_FORMATS}, not a {suffix or 'plain'} file")
    return D.read_records(path)


def load_splits(cfg: common.FinetuneConfig) -> dict[str, list[dict]]:
    records = _read(cfg.data)
    if cfg.val_data or cfg.test_data:
        return {"train": records, "val": _read(cfg.val_data) if cfg.val_data else [],
                "test": _read(cfg.test_data) if cfg.test_data else []}
    return dict(zip(("train", "val", "test"), D.split(records, cfg.split, cfg.split_seed)))


def chat_template(cfg: SFTConfig, lm) -> str | None:
    if cfg.chat_template:
        return Path(cfg.chat_template).read_text(encoding="utf-8")
    return lm.chat_template  # None -> ChatML


def sft_batches(cfg: SFTConfig, lm, parts: dict[str, list[dict]], template: str | None, log=print):
    """(train batch source, validation batches) of response-masked examples."""
    L = common.max_length(cfg, lm.model)
    pad = common.pad_id(lm.tokenizer)
    ex: dict[str, list[D.Example]] = {}
    for split in ("train", "val"):
        full = [D.sft_example(lm.tokenizer, r, i, template, f"{split} data") for i, r in enumerate(parts[split])]
        long = sum(len(e.ids) > L + 1 for e in full)
        if long:
            why = "the model's context" if L == lm.model.config.block_size else f"--max-length {L}"
            log(f"note: {long} of {len(full)} {split} examples are longer than {L} tokens ({why}) and were cut "
                f"to {L}")
        items = [D.truncate(e, L) for e in full]
        kept = [e for e in items if any(e.target[1:])]
        if len(kept) < len(items):
            log(f"note: {len(items) - len(kept)} {split} examples have no response token within max_length={L}")
        ex[split] = kept
    if not ex["train"]:
        raise DataError(f"no training example has a response token within max_length={L} tokens; the prompts are "
                        f"too long: raise --max-length (the model's context is {lm.model.config.block_size})")
    train_items = D.pack(ex["train"], L) if cfg.packing else ex["train"]
    collate = lambda b: D.pad_collate(b, pad, L)  # noqa: E731
    lengths = [len(e) for e in train_items] if getattr(cfg, "group_by_length", False) and not cfg.packing else None
    batches = D.Batches(train_items, cfg.batch_size, collate, seed=cfg.seed, lengths=lengths)
    val = D.Batches(ex["val"], cfg.batch_size, collate, shuffle=False).all() if ex["val"] else None
    log(f"SFT: {len(ex['train'])} train examples ({len(train_items)} rows{' packed' if cfg.packing else ''}), "
        f"{len(ex['val'])} val, max {L} tokens")
    return batches, val


def answer_and_score(lm, records: list[dict], cfg: SFTConfig, template: str | None) -> tuple[list[dict], float]:
    """Greedy answers for `records` and their mean ROUGE-L F against the expected outputs."""
    if cfg.eval_generate == 0 or not records:
        return [], float("nan")
    records = records if cfg.eval_generate < 0 else records[:cfg.eval_generate]
    stop = end_of_turn_markers(template) if any(D.is_chat_record(r) for r in records) else []
    answers: list[dict[str, Any]] = []
    chunk = max(1, cfg.batch_size)
    for s in range(0, len(records), chunk):
        batch = records[s:s + chunk]
        texts = lm.generate([D.sft_prompt(r, template) for r in batch], max_new_tokens=cfg.max_new_tokens,
                            temperature=0.0, stop=stop or None, truncate=True)
        for r, t in zip(batch, texts):
            answers.append({**r, "model_response": str(t).strip()})
    score = sum(rouge_l(a["model_response"], D.sft_reference(a))["fmeasure"] for a in answers) / len(answers)
    return answers, score


def maybe_adapters(model, cfg: SFTConfig, log=print) -> bool:
    """Insert bottleneck adapters (base frozen) when cfg.adapter is set; returns whether it did."""
    if cfg.adapter != "bottleneck":
        return False
    adapters.add_adapters(model, cfg.adapter_size, cfg.adapter_where, cfg.adapter_activation)
    log(f"bottleneck adapters m={cfg.adapter_size} ({cfg.adapter_activation}) after {','.join(cfg.adapter_where)} "
        f"in {model.config.n_layer} blocks: {lora.trainable_report(model)}")
    return True


def pretraining_text(cfg: SFTConfig, lm, log=print) -> dict[str, tuple[Any, Any]]:
    """(trained-on part, held-out tail) of the token stream of --forgetting-data and --replay-data, each read
    once. The tail is the last `heldout_fraction`: what `lmforge pretrain` with that val_fraction held out."""
    parts = {}
    for source in dict.fromkeys(s for s in (cfg.forgetting_data, cfg.replay_data) if s):
        log(f"tokenizing pretraining text {source} ...")
        tokens = D.text_tokens(lm.tokenizer, source)
        parts[source] = train_val_split(tokens, cfg.heldout_fraction)
        log(f"pretraining text {source}: {len(tokens):,} tokens, the last {len(parts[source][1]):,} held out")
    return parts


def forgetting(model, held, cfg: SFTConfig, block: int) -> dict[str, float]:
    """Perplexity of `model` on (at most cfg.forgetting_tokens of) the held-out pretraining text."""
    tokens = held[:min(len(held), cfg.forgetting_tokens)]
    if len(tokens) < 2:
        raise DataError(f"{cfg.forgetting_data}: the held-out part has {len(tokens)} tokens; give more text or a "
                        f"larger --heldout-fraction")
    return perplexity(model, tokens, block_size=block, batch_size=cfg.batch_size)


def run_sft(cfg: SFTConfig, log=print) -> dict:
    """Train; write test_responses.json and metrics.json; returns the metrics."""
    cfg.check_paths()
    lm = common.load_base(cfg)
    out = Path(cfg.out)
    parts = load_splits(cfg)
    template = chat_template(cfg, lm)
    batches, val = sft_batches(cfg, lm, parts, template, log)
    L = common.max_length(cfg, lm.model)
    text = pretraining_text(cfg, lm, log)
    metrics: dict[str, Any] = {}
    if cfg.rouge_before:
        _, metrics["rouge_l_before"] = answer_and_score(lm, parts["test"], cfg, template)
        log(f"ROUGE-L before training: {metrics['rouge_l_before']:.4f}")
    if cfg.forgetting_data:
        before = forgetting(lm.model, text[cfg.forgetting_data][1], cfg, L)
        metrics.update(forgetting_loss_before=before["loss"], forgetting_ppl_before=before["perplexity"])
    uses_lora = common.maybe_lora(lm.model, cfg, log)
    uses_adapters = maybe_adapters(lm.model, cfg, log)
    source = batches
    if cfg.replay_data:
        replay = PackedBatches(text[cfg.replay_data][0], cfg.batch_size, L, seed=cfg.seed)
        source = D.ReplayMix(batches, replay, cfg.replay_ratio)
        log(f"replay: {cfg.replay_ratio:.0%} of the batches are {cfg.batch_size} x {L}-token windows of "
            f"{cfg.replay_data} (plain next-token loss)")
    result = train(lm.model, source, cfg.train_config(len(source)), val_data=val, loss_fn=response_loss,
                   out_dir=out, save_model=common.lm_saver(lm, cfg, uses_lora, uses_adapters), log=log)
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    metrics.update(val_loss_before=vals[0] if vals else None, val_loss_after=result.val_loss,
                   train_loss=result.train_loss, steps=result.step)
    if cfg.forgetting_data:
        after = forgetting(lm.model, text[cfg.forgetting_data][1], cfg, L)
        metrics.update(forgetting_loss_after=after["loss"], forgetting_ppl_after=after["perplexity"],
                       forgetting_tokens=after["tokens"])
        change = after["perplexity"] / metrics["forgetting_ppl_before"] - 1
        log(f"forgetting: perplexity on {after['tokens']:,} held-out tokens of {cfg.forgetting_data}: "
            f"{metrics['forgetting_ppl_before']:.2f} before, {after['perplexity']:.2f} after ({change:+.1%})")
    answers, metrics["rouge_l"] = answer_and_score(lm, parts["test"], cfg, template)
    if answers:
        atomic_write_json(out / "test_responses.json", answers)
        log(f"ROUGE-L on {len(answers)} test answers: {metrics['rouge_l']:.4f} ({out / 'test_responses.json'})")
    common.finish(lm, cfg, uses_lora, log, uses_adapters=uses_adapters)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
