"""`LM`: what `lmforge.load` returns — a model, its tokenizer, its config and its default inference controls.

    lm = lmforge.load("runs/demo")
    lm.generate("The def statement", max_new_tokens=30, temperature=0.8, top_p=0.95)
    for delta in lm.stream("Once upon a time"): print(delta, end="")
    lm.chat([{"role": "user", "content": "Hi"}])
    lm.score("The capital of France is", " Paris")
    lm.save("my-model")                       # an lmforge model directory

This class only holds things together and delegates: generation lives in `lmforge.generation.api`, directory I/O in
`lmforge.formats.native`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.models.config import ModelConfig
from lmforge.errors import ConfigError


@dataclass
class GenerationConfig:
    """Default inference controls, stored as the model directory's generation_config.json.

    Reads Hugging Face's generation_config.json keys too (`do_sample: false` means greedy); keys lmforge does not
    use are kept in `extra` so a round trip loses nothing.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 -> greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d.pop(k) for k in list(d) if k in names and k != "extra"}
        extra = {**d.pop("extra", {}), **d}
        if extra.get("do_sample") is False and "temperature" not in kwargs:
            kwargs["temperature"] = 0.0
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**extra, **{k: v for k, v in d.items() if v is not None}}

    def replace(self, **overrides) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(self)}
        bad = [k for k in overrides if k not in names]
        if bad:
            raise ConfigError(f"unknown generation control {bad[0]!r}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


class LM:
    """A loaded model: `.model` (nn.Module), `.tokenizer`, `.config`, `.generation_config`."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: ModelConfig | None = None,
                 generation_config: GenerationConfig | None = None, chat_template: str | None = None,
                 path: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else model.config
        self.generation_config = generation_config or GenerationConfig()
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.path = path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        n = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        return f"LM({self.config.name or 'model'}, {n / 1e6:.2f}M params, {self.dtype}, {self.device})"

    # ---- generation (lmforge.generation.api) -------------------------------------------------------------------------
    def generate(self, prompt, **controls):
        from lmforge.generation.api import generate

        return generate(self, prompt, **controls)

    def stream(self, prompt, **controls):
        from lmforge.generation.api import stream

        return stream(self, prompt, **controls)

    def chat(self, messages, **controls):
        from lmforge.generation.api import chat

        return chat(self, messages, **controls)

    def score(self, prompt, continuation):
        from lmforge.generation.api import score

        return score(self, prompt, continuation)

    # ---- files (lmforge.formats.native) ------------------------------------------------------------------------------
    def save(self, path) -> None:
        from lmforge.formats.native import save

        save(self, path)
