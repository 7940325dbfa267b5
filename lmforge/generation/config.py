"""`GenerationConfig`: a model directory's default inference controls (generation_config.json).

These are the defaults a model ships with: `SamplingParams`' fields (lmforge.generation.sampling, one declaration
and one validation for every control) plus the special token ids. A call's own controls override them field by
field, and the result is a `SamplingParams` again before any token is drawn.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import ConfigError, GenerationError
from lmforge.generation.sampling import SamplingParams


# per-request switches of SamplingParams that are not a model's defaults: never written to generation_config.json
# (a JSON constraint is a property of one request's answer, not of the model; the key in a file goes to `extra`)
_REQUEST_ONLY = ("logprobs", "top_logprobs", "ignore_eos", "json", "json_schema")


@dataclass
class GenerationConfig(SamplingParams):
    """Default inference controls, stored as the model directory's generation_config.json.

    The sampling controls are `SamplingParams`' own fields (declared and validated once, there); this class adds
    the special token ids a model's file carries. Reads Hugging Face's generation_config.json keys too
    (`do_sample: false` means greedy); keys lmforge does not use are kept in `extra` so a round trip loses nothing.
    """

    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "generation_config.json") -> "GenerationConfig":
        """A GenerationConfig from a parsed generation_config.json; a bad value is a one-line error naming `source`."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", *_REQUEST_ONLY}
        kwargs = {k: d.pop(k) for k in list(d) if k in names and d[k] is not None}  # null: the default
        extra = {**d.pop("extra", {}), **d}
        if extra.get("do_sample") is False and "temperature" not in kwargs:
            kwargs["temperature"] = 0.0
        try:
            return cls(**kwargs, extra=extra)
        except GenerationError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        for k in _REQUEST_ONLY:
            d.pop(k)
        return {**extra, **{k: v for k, v in d.items() if v is not None}}

    def replace(self, **overrides) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(self)}
        bad = [k for k in overrides if k not in names]
        if bad:
            raise ConfigError(f"unknown generation control {bad[0]!r}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
