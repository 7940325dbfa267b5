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

import torch

from lmforge import encoder_lm
from lmforge.formats import native
from lmforge.generation import api
from lmforge.generation.config import GenerationConfig
from lmforge.models.config import ModelConfig


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

    # ---- generation (lmforge.generation.api) -------------------------------------------------------------
    def generate(self, prompt, params=None, **controls):
        """See `lmforge.generation.api.generate`: `params` is a `SamplingParams`, controls override its fields."""
        return api.generate(self, prompt, params, **controls)

    def stream(self, prompt, params=None, **controls):
        return api.stream(self, prompt, params, **controls)

    def chat(self, messages, params=None, **controls):
        return api.chat(self, messages, params=params, **controls)

    def score(self, prompt, continuation):
        return api.score(self, prompt, continuation)

    def embed(self, texts, **kwargs):
        """Sentence embeddings need an encoder: on a decoder this is a one-line error naming the model."""
        return encoder_lm.embed(self, texts, **kwargs)

    # ---- files (lmforge.formats.native) -------------------------------------------------------------------
    def save(self, path) -> None:
        native.save(self, path)
