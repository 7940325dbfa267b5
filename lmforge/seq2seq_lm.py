"""`Seq2SeqLM`: what `lmforge.load` returns for an encoder-decoder (T5, flan-t5, BART, mBART): model, tokenizer,
generation defaults.

    lm = lmforge.load("flan-t5-small/")                      # a Hugging Face T5 (or BART) directory
    lm.generate("translate English to German: Hello")       # greedy (or the directory's defaults) -> str
    lm.generate(["a", "b"], num_beams=4, max_new_tokens=40)  # beam search -> list[str]
    lm.generate("...", num_beams=4, num_return_sequences=3)  # -> the 3 best hypotheses (list[str])
    lm.generate("...", temperature=0.8, top_p=0.95, seed=0)  # sampling with every lmforge control
    lm.generate_ids([[ids...]], num_beams=4)                 # token ids in, generated ids out
    lm.save("out/")                                          # HF layout: transformers loads it as it is

How a text is generated: the input is tokenized (T5 appends </s>) and encoded once; the decoder starts from
`decoder_start_token_id` and runs the shared decode loop (`lmforge.generation.loop.decode_steps`: sampling, every
control, stop strings and token ids, seeds) through `_DecoderSteps`, a thin module that makes the decoder look like
a decoder-only model to that loop (new tokens + cache in, logits out). With `num_beams > 1` it runs
`lmforge.generation.beam.seq2seq_beam_search` instead. Generated text stops at EOS (</s>), which is not returned.

Token rules (`DecodingRules`), as transformers' generation applies them to encoder-decoders: BART's checkpoints
force `<s>` as the first generated token (`forced_bos_token_id`) and `</s>` as the last one allowed
(`forced_eos_token_id`), and summarizers set a `min_length` before which `</s>` is banned. They come from the
directory's generation_config.json (or config.json), like `num_beams`, `length_penalty`, `no_repeat_ngram_size`
and `max_length`, and a keyword control overrides each.

This class holds things together and delegates; the models are `lmforge.models.t5` and `lmforge.models.bart`,
files are `lmforge.formats.t5` and `lmforge.formats.bart`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.errors import GenerationError
from lmforge.formats.bart import export_bart, is_bart_config, load_bart_dir
from lmforge.formats.t5 import T5Parts, export_t5, load_t5_dir
from lmforge.generation.api import eos_token_ids, resolve_params
from lmforge.generation.beam import BeamParams, hypothesis_completion, seq2seq_beam_search_batch
from lmforge.generation.config import GenerationConfig
from lmforge.generation.loop import _completion, _eval_mode, _new_checker, decode_steps
from lmforge.generation.sampling import SamplingParams
from lmforge.models.bart import Bart
from lmforge.models.t5 import T5
from lmforge.utils import read_json


@dataclass
class DecodingRules:
    """Which tokens may come next, by decoder length `n` (tokens so far, the start token included), as
    transformers' MinLength, ForcedBOS and ForcedEOS logits processors rule them:

        n < min_length                    -> EOS is not allowed (or new tokens < min_new_tokens)
        n == 1 and forced_bos_token_id    -> only that token (BART: <s> right after the start token </s>)
        n == max_length - 1 and forced_eos_token_id -> only that token (the last token allowed is </s>)

    max_length = 1 + max_new_tokens. A forced token gets 0, every other token -inf, as transformers sets the
    scores. Greedy decoding and sampling apply the rules to the logits (`_DecoderSteps`), beam search to the
    log-probabilities (`beam_search(rules=...)`), where transformers applies them too."""

    eos_token_ids: tuple[int, ...] = ()
    min_length: int = 0
    min_new_tokens: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    max_length: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.min_length > 1 or self.min_new_tokens or self.forced_bos_token_id is not None
                    or (self.forced_eos_token_id is not None and self.max_length is not None))

    def apply(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        """logits (R, V) of the token that follows n decoder tokens -> the same with the rules applied."""
        if (n < self.min_length or n - 1 < self.min_new_tokens) and self.eos_token_ids:
            logits = logits.clone()
            logits[:, list(self.eos_token_ids)] = float("-inf")
        for forced, when in ((self.forced_bos_token_id, n == 1),
                             (self.forced_eos_token_id, self.max_length is not None and n == self.max_length - 1)):
            if forced is not None and when:
                only = torch.full_like(logits, float("-inf"))
                only[:, forced] = 0.0
                logits = only
        return logits

    def apply_positions(self, logits: torch.Tensor, first_n: int) -> torch.Tensor:
        """logits (B, T, V) for T consecutive decoder positions, the first following `first_n` tokens."""
        if not self.active:
            return logits
        return torch.stack([self.apply(logits[:, t], first_n + t) for t in range(logits.shape[1])], dim=1)


class _DecoderSteps(torch.nn.Module):
    """The T5 decoder with a fixed encoder memory, shaped like a decoder-only model for `decode_steps`:
    `forward(ids (B, T), attention_mask, kv_cache, logits_to_keep) -> (B, T', V)`, `new_cache(B, max_len)`."""

    def __init__(self, model: T5 | Bart, memory: torch.Tensor, memory_mask: torch.Tensor,
                 rules: DecodingRules | None = None):
        super().__init__()
        self.t5 = model
        self.memory, self.memory_mask = memory, memory_mask  # (B, S, C), (B, S)
        self.config = model.config  # decode_steps reads config.vocab_size
        self.rules = rules or DecodingRules()

    def new_cache(self, batch_size: int, max_len: int):
        with torch.inference_mode():  # the loop decodes in inference mode; the cache's tensors belong there
            return self.t5.new_cache(self.memory, self.memory_mask, max_len)

    def forward(self, ids: torch.Tensor, attention_mask=None, kv_cache=None, logits_to_keep: int = 0):
        # every row's decoder prompt is the one start token, so rows never need left padding; a finished row's
        # padding token is fed like any other and its logits are ignored by the loop
        n = kv_cache.length if kv_cache is not None else 0  # decoder tokens before this call
        if kv_cache is not None:
            logits = self.t5.decode(ids, cache=kv_cache)
        else:  # the loop's no-cache reference path: the whole decoder sequence every step
            logits = self.t5.decode(ids, self.memory, self.memory_mask)
        logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        return self.rules.apply_positions(logits, n + ids.shape[1] - logits.shape[1] + 1)


class Seq2SeqLM:
    """A loaded encoder-decoder: `.model` (T5 or Bart), `.tokenizer` (UnigramTokenizer, RobertaTokenizer),
    `.generation_config`."""

    is_encoder_decoder = True
    is_seq2seq = True  # lmforge.pipelines: text2text-generation, summarization, translation
    chat_template = None

    def __init__(self, model: T5 | Bart, tokenizer=None, generation_config: GenerationConfig | None = None,
                 path: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.generation_config = generation_config or GenerationConfig(eos_token_id=cfg.eos_token_id,
                                                                       pad_token_id=cfg.pad_token_id)
        self.path = path

    @classmethod
    def from_parts(cls, parts: T5Parts) -> "Seq2SeqLM":
        return cls(parts.model, parts.tokenizer, parts.generation_config, parts.path)

    @property
    def config(self):
        return self.model.config

    @property
    def task_prefixes(self) -> dict[str, str]:
        """Input prefixes from config.json's task_specific_params, as T5 checkpoints ship them:
        {"summarization": "summarize: ", "translation_en_to_de": "translate English to German: ", ...}; a lone
        translation_* entry also serves plain "translation"."""
        params = self.config.extra.get("task_specific_params") or {}
        out = {task: p["prefix"] for task, p in params.items() if isinstance(p, dict) and p.get("prefix")}
        translations = [v for k, v in out.items() if k.startswith("translation_")]
        if len(translations) == 1:
            out.setdefault("translation", translations[0])
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        kind = "bart" if isinstance(self.model, Bart) else "t5"
        return f"Seq2SeqLM({self.config.name or kind}, {n / 1e6:.2f}M params, {self.config.feed_forward_proj})"

    # ---- generation ---------------------------------------------------------------------------------------------
    def encode_inputs(self, texts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Texts -> input ids (with </s>, as the tokenizer's template says); id lists are used as given."""
        out = []
        for t in texts:
            if isinstance(t, str):
                if self.tokenizer is None:
                    raise GenerationError("this model has no tokenizer: pass token id lists")
                out.append(self.tokenizer.encode(t))
            elif all(isinstance(i, int) for i in t):
                out.append(list(t))
            else:
                raise GenerationError("an input must be a string or a list of token ids")
            if not out[-1]:
                raise GenerationError("empty input: there is nothing to encode")
        return out

    def generate_ids(self, inputs: Sequence[Sequence[int]], **controls: Any) -> list:
        """Generated token ids for each input (EOS excluded). With num_return_sequences > 1 each item is a list of
        that many id lists, best first. Controls: SamplingParams' fields plus BeamParams' (num_beams, ...)."""
        return [[list(c.token_ids) for c in cs] if isinstance(cs, list) else list(cs.token_ids)
                for cs in self._generate(self.encode_inputs(inputs), controls)]

    def generate(self, text: str | Sequence[int] | Sequence[str], **controls: Any):
        """Text in, text out: one input -> str (a list of str with num_return_sequences > 1); a list -> a list.
        The strings are `Completion`s (`.token_ids`, `.finish_reason`)."""
        batch = isinstance(text, (list, tuple)) and len(text) > 0 and not isinstance(text[0], int)
        outs = self._generate(self.encode_inputs(list(text) if batch else [text]), controls)
        return outs if batch else outs[0]

    # generation_config.json keys read as defaults for the beam and the token rules (transformers' names)
    _BEAM_DEFAULTS = ("num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size", "num_return_sequences")
    _RULES = ("min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id")

    def _defaults(self, controls: dict[str, Any]) -> dict[str, Any]:
        """Controls with the directory's generation defaults filled in where the caller gave none."""
        gc = self.generation_config
        extra = getattr(gc, "extra", {}) or {}
        out = dict(controls)
        for key in self._BEAM_DEFAULTS + self._RULES:
            if out.get(key) is None and extra.get(key) is not None:
                out[key] = extra[key]
        for key in ("forced_bos_token_id", "forced_eos_token_id"):  # config.json's, as transformers reads them
            if key not in out and getattr(self.config, key, None) is not None:
                out[key] = getattr(self.config, key)
        max_length = extra.get("max_length")
        if out.get("max_new_tokens") is None and isinstance(max_length, int) and max_length > 1 \
                and gc.max_new_tokens == SamplingParams.max_new_tokens:
            out["max_new_tokens"] = max_length - 1  # max_length counts the decoder's start token
        return out

    def _generate(self, inputs: list[list[int]], controls: dict[str, Any]) -> list:
        controls = self._defaults(controls)
        rule_args = {k: controls.pop(k) for k in self._RULES if k in controls}
        beam = BeamParams.pop_from(controls)
        use_cache = controls.pop("use_cache", True)  # a run option, not a sampling control
        params = resolve_params(self, controls)
        rules = DecodingRules(eos_token_ids=tuple(eos_token_ids(self)), max_length=1 + params.max_new_tokens,
                              **{k: v for k, v in rule_args.items() if v is not None})
        model = self.model
        if beam.num_beams > 1 or beam.num_return_sequences > 1 or beam.no_repeat_ngram_size:
            out = []  # every input searched together (B x num_beams decoder rows)
            hyps_all = seq2seq_beam_search_batch(model, inputs, beam, params.max_new_tokens, params.stop_token_ids,
                                                 params, rules=rules.apply if rules.active else None)
            for ids, hyps in zip(inputs, hyps_all):
                comps = [hypothesis_completion(self.tokenizer, h.token_ids, params, len(ids)) for h in hyps]
                out.append(comps if beam.num_return_sequences > 1 else comps[0])
            return out
        device = self.device
        S = max(len(i) for i in inputs)
        ids = torch.full((len(inputs), S), self.config.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(inputs), S, dtype=torch.bool, device=device)
        for r, i in enumerate(inputs):  # right padding: the encoder is bidirectional, padding is masked out
            ids[r, :len(i)] = torch.as_tensor(i, device=device)
            mask[r, :len(i)] = True
        with _eval_mode(model):
            with torch.inference_mode():
                memory = model.encode(ids, mask)  # (B, S, C): once per input
            steps = _DecoderSteps(self.model, memory, mask, rules)
            start = [[self.config.decoder_start_token_id]] * len(inputs)
            checkers = [_new_checker(self.tokenizer, params, s) for s in start]
            for _ in decode_steps(steps, start, params, checkers, use_cache=use_cache,
                                  pad_id=self.config.pad_token_id):
                pass
        return [_completion(c, len(i)) for c, i in zip(checkers, inputs)]

    def stream(self, *args, **kwargs):
        raise GenerationError("stream() is for decoder-only models; use generate() with an encoder-decoder")

    def chat(self, *args, **kwargs):
        raise GenerationError("chat() is for decoder-only chat models; use generate(text) with an encoder-decoder")

    # ---- files --------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None):
        """An HF T5ForConditionalGeneration (or BartForConditionalGeneration) directory: config, safetensors,
        tokenizer files, generation_config."""
        export = export_bart if isinstance(self.model, Bart) else export_t5
        return export(self.model, self.tokenizer, path, self.generation_config, dtype)


def load_seq2seq(path: str | os.PathLike, dtype="auto", device=None) -> Seq2SeqLM:
    """`lmforge.load`'s reader for a Hugging Face T5 or BART directory (config.json's model_type decides)."""
    if is_bart_config(read_json(Path(path) / "config.json")):
        return Seq2SeqLM.from_parts(load_bart_dir(path, dtype, device))
    return Seq2SeqLM.from_parts(load_t5_dir(path, dtype, device))
