"""Sampling: turning a next-token predictor's logits into one token.

A language model gives, for a prefix x_1..x_t, logits z (one score per vocabulary token); softmax(z) is the
model's distribution over the next token. Generation repeats: run the model, turn the logits into one token,
append it, until a stop condition. Everything interesting happens in "turn the logits into one token":

    logits -> repetition_penalty -> frequency/presence -> temperature -> top_k  -> top_p       -> min_p    -> pick
              (prompt + output)     (output only, OpenAI)  z / T          keep k    keep mass p    drop small
    pick = argmax (greedy, temperature 0) or a draw from softmax(filtered logits) with an explicit torch.Generator

Each stage is a small pure function below, in the order Hugging Face applies them (penalties, then temperature,
top-k, top-p, min-p), so `generate(do_sample=True, ...)` in transformers and here sample from the same distribution.

`SamplingParams` is the one typed, validated set of controls: the CLI flags, the server's request fields, a
model's generation_config.json defaults and `lm.generate(**controls)` all become one before a token is drawn.

References: Holtzman et al. 2020 (top-p / nucleus sampling); Keskar et al. 2019 (CTRL, repetition penalty);
OpenAI API docs (frequency/presence penalties); Nguyen et al. 2024 (min-p); gpt-fast and nanochat's engine (shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lmforge.errors import GenerationError
from lmforge.utils import check_seed


@dataclass
class SamplingParams:
    """Every control of one generation request. Validated on construction (`GenerationError`, one line).

    max_new_tokens      most tokens to generate (also capped by the context window)
    temperature         0 -> greedy (argmax); <1 sharper, >1 flatter distribution
    top_k               keep only the k most likely tokens (None/0: off)
    top_p               keep the smallest set of most likely tokens whose probability mass is >= p (None/1: off)
    min_p               drop tokens whose probability is < min_p * (probability of the most likely token)
    repetition_penalty  HF/CTRL: for tokens already in prompt or output, a positive logit is divided by it and a
                        negative one multiplied by it; > 1 discourages repeats (None/1: off)
    frequency_penalty   OpenAI: subtract penalty * (times the token appeared in the output so far)
    presence_penalty    OpenAI: subtract penalty once if the token appeared in the output so far
    stop                strings that end generation; the stop string itself is not returned
    stop_token_ids      token ids that end generation (EOS is added by `resolve_params`); not returned
    seed                seeds the sampler: the same seed gives the same text (each row of a batch uses it)
    logprobs            record the log-probability of each generated token (under the model, before controls)
    top_logprobs        also record the n most likely alternatives at each step (implies logprobs)
    ignore_eos          keep going past stop tokens (benchmarks)
    json                the output is one JSON object: constrained decoding (lmforge.generation.constrain)
    json_schema         the output is JSON following this schema (a dict; the subset `constrain.schema_machine`
                        reads); implies json
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    json: bool = False
    json_schema: dict | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s != ""]
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0 or math.isnan(self.temperature):
            raise GenerationError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is not None and not (_is_number(self.repetition_penalty)
                                                        and self.repetition_penalty > 0):
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise GenerationError(f"{name} must be in [-2, 2] (OpenAI's range), got {v!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise GenerationError(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        if self.top_logprobs:
            self.logprobs = True
        check_seed(self.seed, error=GenerationError)  # an int torch can seed with (the server answers 400)
        if any(not isinstance(s, str) for s in self.stop):
            raise GenerationError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if not isinstance(self.json, bool):
            raise GenerationError(f"json must be True or False, got {self.json!r}")
        if self.json_schema is not None:
            if not isinstance(self.json_schema, dict):
                raise GenerationError(f"json_schema must be a JSON schema object (a dict), got "
                                      f"{type(self.json_schema).__name__}")
            self.json = True

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or top_k=1) leaves one candidate: no randomness is drawn at all."""
        return self.temperature == 0 or self.top_k == 1



def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- the pure functions: logits (B, V) in, logits (B, V) out ------------------------------------------------------
NEG_INF = float("-inf")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T. T < 1 sharpens (as T -> 0 all mass goes to the argmax), T > 1 flattens toward uniform.

    >>> apply_temperature(torch.tensor([[2.0, 1.0]]), 0.5)
    tensor([[4., 2.]])
    """
    if temperature <= 0:
        raise GenerationError(f"temperature must be > 0 to scale logits, got {temperature}; use greedy() for 0")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf (ties with the k-th are kept, as in HF).

    >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    tensor([[-inf, 3., 2.]])
    """
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is >= p.

    Sort probabilities high to low; a token is kept if the mass of the tokens ranked above it is still < p (so the
    token that crosses p is kept, and the most likely token always is).
    >>> top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.7)   # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep two
    tensor([[-0.6931, -1.2040,    -inf]])
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of the tokens ranked above each one
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's: a cut that adapts to confidence.

    A confident step (top prob 0.9, min_p 0.1) keeps only tokens >= 0.09; a flat one (top 0.05) keeps many.
    >>> min_p_filter(torch.log(torch.tensor([[0.6, 0.3, 0.1]])), 0.2)   # threshold 0.2 * 0.6 = 0.12
    tensor([[-0.5108, -1.2040,    -inf]])
    """
    if not min_p:
        return logits
    probs = logits.softmax(dim=-1)  # (B, V)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """CTRL / Hugging Face repetition penalty on every token seen in the prompt or output (`seen`: (B, V) bool).

    A positive logit is divided by the penalty, a negative one multiplied, so penalty > 1 always lowers a seen
    token's score. Note the asymmetry: it is a multiplicative change of the logit, not of the probability.
    >>> apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[True, True, False]]), 2.0)
    tensor([[ 1., -4.,  1.]])
    """
    if penalty is None or penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency_penalty: float,
                                     presence_penalty: float) -> torch.Tensor:
    """OpenAI's penalties: z_j -= c_j * frequency_penalty + (c_j > 0) * presence_penalty.

    counts: (B, V) how many times each token occurs in the generated output so far (not the prompt, as OpenAI and
    vLLM do). Frequency grows with every repeat; presence is a flat one-time push toward new tokens.
    >>> apply_frequency_presence_penalty(torch.zeros(1, 3), torch.tensor([[2, 1, 0]]), 0.5, 1.0)
    tensor([[-2.0000, -1.5000,  0.0000]])
    """
    if not frequency_penalty and not presence_penalty:
        return logits
    counts = counts.to(logits.dtype)
    return logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row (the first one on ties, like torch.argmax and HF). (B, V) -> (B,)"""
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, generators: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Draw one token per row from softmax(logits). One generator for all rows, or one per row. (B, V) -> (B,)

    Tokens filtered to -inf get probability exactly 0 and are never drawn.
    """
    probs = logits.float().softmax(dim=-1)  # (B, V)
    if generators is None or isinstance(generators, torch.Generator):
        return torch.multinomial(probs, 1, generator=generators)[:, 0]
    if len(generators) != probs.shape[0]:
        raise GenerationError(f"{len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generators)])


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   output_counts: torch.Tensor | None = None) -> torch.Tensor:
    """All the controls in order, in fp32: penalties, temperature, top-k, top-p, min-p. (B, V) -> (B, V)

    seen: (B, V) bool, tokens present in prompt or output (for repetition_penalty);
    output_counts: (B, V) counts of tokens generated so far (for frequency/presence penalties).
    For greedy params only the penalties apply (the filters never change the argmax).
    """
    logits = logits.float()
    if params.repetition_penalty not in (None, 1.0):
        if seen is None:
            raise GenerationError("repetition_penalty needs the seen-token mask")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        if output_counts is None:
            raise GenerationError("frequency/presence penalties need the output token counts")
        logits = apply_frequency_presence_penalty(logits, output_counts, params.frequency_penalty,
                                                  params.presence_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return logits


def sample_next_token(logits: torch.Tensor, params: SamplingParams,
                      generators: torch.Generator | Sequence[torch.Generator] | None = None,
                      seen: torch.Tensor | None = None, output_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row: (B, V) logits -> (B,) ids. Greedy when `params.greedy`, else a seeded draw."""
    processed = process_logits(logits, params, seen, output_counts)
    return greedy(processed) if params.greedy else sample(processed, generators)


def make_generators(seed: int | None, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row. A given seed seeds every row alike, so a prompt samples the same text alone or in a
    batch; without a seed each row gets a different seed drawn from torch's global RNG (`torch.manual_seed`)."""
    gens = []
    for _ in range(n):
        g = torch.Generator(device=device)
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        gens.append(g)
    return gens


def token_counts(rows: Sequence[Sequence[int]], vocab_size: int, device=None) -> torch.Tensor:
    """(B, V) counts of each token id in each row. [[1, 1, 2]], V=4 -> [[0, 2, 1, 0]]."""
    counts = torch.zeros(len(rows), vocab_size, dtype=torch.long, device=device)
    for i, ids in enumerate(rows):
        if len(ids):
            counts[i].scatter_add_(0, torch.as_tensor(list(ids), device=device),
                                   torch.ones(len(ids), dtype=torch.long, device=device))
    return counts
