"""Recipe: zero-, one- and few-shot classification of a labelled data set (in-context learning, no training).

    lmforge fewshot stories260K.bin --data SMSSpamCollection --shots 0,1,4 --method score
    lmforge fewshot runs/chat --data data.jsonl --style chat --instruction "Is this SMS spam or ham?" --out runs/fs

The data is split once (seeded): demonstrations are drawn from the first part, the test set is a balanced sample
of the rest (`per_label` examples of each label, so chance is 1/labels). For each k in `shots` and each seed in
`seeds`, k demonstrations are drawn (balanced across labels unless `balanced: false`) and every test example is
classified (`lmforge.tasks.prompting`). Prints one line per run and the mean over seeds; with `out`, writes
metrics.json and a confusion-matrix PNG per k (the first seed's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import ConfigError, DataError
from lmforge.finetune.metrics import plot_confusion
from lmforge.tasks import prompting
from lmforge.utils import atomic_write_json


@dataclass
class FewShotConfig:
    model: str = field(default="", metadata={"help": "model directory, HF dir or Hub id, .gguf or llama2.c .bin"})
    data: str = field(default="", metadata={"help": "labelled data: TSV label<TAB>text, JSON/JSONL records"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer file for a llama2.c .bin model"})
    shots: list[int] = field(default_factory=lambda: [0, 1, 4], metadata={
        "help": "numbers of demonstrations, comma-separated (default: 0,1,4)"})
    method: str = field(default="score", metadata={
        "help": "score (log p of each label) or generate (greedy answer, parsed)"})
    style: str = field(default="plain", metadata={"help": "plain (Input:/Label: blocks) or chat (chat template)"})
    instruction: str = field(default="", metadata={"help": "task description put first (chat: system message)"})
    input_field: str = field(default="", metadata={"help": "record field holding the input (default: text)"})
    label_field: str = field(default="", metadata={"help": "record field holding the label (default: label)"})
    labels: list[str] = field(default_factory=list, metadata={"help": "the classes (default: the data's)"})
    per_label: int = field(default=100, metadata={"help": "test examples per label (balanced test set)"})
    pool_fraction: float = field(default=0.5, metadata={
        "help": "share of the data demonstrations are drawn from; the test set comes from the rest"})
    calibrate: bool = field(default=False, metadata={
        "help": "score method: divide out the label prior measured on content-free inputs (Zhao et al. 2021)"})
    balanced: bool = field(default=True, metadata={"help": "draw demonstrations balanced across labels"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "one run per seed of the demonstrations, comma-separated (default: 0)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward"})
    out: str = field(default="", metadata={"help": "directory for metrics.json and confusion PNGs (optional)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the metrics.json already in --out"})

    def __post_init__(self):
        if not self.model or not self.data:
            raise ConfigError("fewshot needs a model and --data")
        if self.method not in ("score", "generate"):
            raise ConfigError(f"method must be 'score' or 'generate', got {self.method!r}")
        if self.calibrate and self.method != "score":
            raise ConfigError("--calibrate adjusts label log-likelihoods: it needs --method score")
        if not 0 < self.pool_fraction < 1:
            raise ConfigError(f"pool_fraction must be in (0, 1), got {self.pool_fraction}")
        if self.per_label < 1 or not self.shots or min(self.shots) < 0 or not self.seeds:
            raise ConfigError("per_label must be >= 1, and shots (each >= 0) and seeds must not be empty")
        prompting.PromptFormat(style=self.style)  # checks the style
        if self.out and (Path(self.out) / "metrics.json").exists() and not self.overwrite:
            raise ConfigError(f"{self.out} already holds a metrics.json; pass --overwrite to replace it")


def run_fewshot(cfg: FewShotConfig, log=print) -> dict:
    import lmforge

    lm = lmforge.load(cfg.model, tokenizer=cfg.tokenizer or None)
    examples = prompting.load_examples(cfg.data, cfg.input_field or None, cfg.label_field or None)
    random.Random(1234).shuffle(examples)
    cut = int(len(examples) * cfg.pool_fraction)
    labels = cfg.labels or sorted({ex.label for ex in examples})
    pool = [ex for ex in examples[:cut] if ex.label in labels]
    test = prompting.balanced_subset([ex for ex in examples[cut:] if ex.label in labels], cfg.per_label, seed=1234)
    if not test:
        raise DataError(f"{cfg.data}: no test example carries one of the labels {labels}")
    fmt = prompting.PromptFormat(style=cfg.style, instruction=cfg.instruction)
    log(f"{cfg.model}: {len(labels)} labels {labels}, {len(pool)} examples to draw demonstrations from, "
        f"{len(test)} test examples; method {cfg.method}, {cfg.style} prompts")
    runs, summary = [], []
    for k in cfg.shots:
        results = []
        for seed in cfg.seeds:
            shots = prompting.draw_shots(pool, k, seed=seed, balanced=cfg.balanced)
            r = prompting.evaluate_fewshot(lm, shots, test, labels, cfg.method, fmt, cfg.batch_size, cfg.calibrate,
                                           log=log)
            results.append(r)
            runs.append({"seed": seed, **r.to_dict()})
            log(f"{k}-shot seed {seed}: accuracy {r.accuracy:.3f}, balanced accuracy {r.balanced_accuracy:.3f}"
                + (f", unparsed {r.unparsed}" if r.unparsed else "") + (f", truncated {r.truncated}" if r.truncated
                                                                        else "") + f"  confusion {r.confusion}")
        mean = {m: sum(getattr(r, m) for r in results) / len(results) for m in ("accuracy", "balanced_accuracy")}
        summary.append({"shots": k, **mean, "runs": len(results)})
        if len(results) > 1:
            log(f"{k}-shot mean over {len(results)} seeds: accuracy {mean['accuracy']:.3f}, "
                f"balanced accuracy {mean['balanced_accuracy']:.3f}")
        if cfg.out:
            png = plot_confusion(results[0].confusion_square(), results[0].columns, Path(cfg.out) /
                                 f"confusion_{k}shot.png", title=f"{k}-shot, {cfg.method} (seed {cfg.seeds[0]})")
            log(f"confusion matrix: {png}")
    report = {"model": cfg.model, "data": cfg.data, "method": cfg.method, "style": cfg.style,
              "calibrate": cfg.calibrate, "labels": labels,
              "n_test": len(test), "chance_balanced_accuracy": 1 / len(labels), "summary": summary, "runs": runs}
    if cfg.out:
        atomic_write_json(Path(cfg.out) / "metrics.json", report)
        log(f"metrics: {Path(cfg.out) / 'metrics.json'}")
    return report
