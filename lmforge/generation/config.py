"""`GenerationConfig`: a model directory's default inference controls (generation_config.json).

These are the defaults a model ships with; a call's own controls override them field by field, and the result is
checked and turned into `SamplingParams` (lmforge.generation.sampling) before any token is drawn.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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
