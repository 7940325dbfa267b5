"""Text generation: turning a next-token predictor into a writer, one token at a time.

A language model gives, for a prefix x_1..x_t, logits z (one score per vocabulary token); softmax(z) is the
model's distribution over the next token. Generation repeats: run the model, turn the logits into one token,
append it, until a stop condition. Everything interesting happens in "turn the logits into one token":

    logits -> repetition_penalty -> frequency/presence -> temperature -> top_k  -> top_p       -> min_p    -> pick
              (prompt + output)     (output only, OpenAI)  z / T          keep k    keep mass p    drop small
    pick = argmax (greedy, temperature 0) or a draw from softmax(filtered logits) with an explicit torch.Generator

Each stage is a small pure function below, in the order Hugging Face applies them (penalties, then temperature,
top-k, top-p, min-p), so `generate(do_sample=True, ...)` in transformers and here sample from the same distribution.

Decoding with a KV cache. Attention at step t needs the keys and values of every earlier token; they never change,
so we compute the prompt's once ("prefill", one forward over T tokens) and then feed a single new token per step
("decode"), appending its k/v to a pre-allocated `KVCache` (lmforge.model). Without the cache each step re-runs the
whole sequence: O(T^2) work instead of O(T). `use_cache=False` keeps that slow path as the reference the tests
compare against.

Batches. Prompts of different lengths are left-padded into one (B, T) tensor with an attention mask, so every row's
last column is its newest token; each row stops on its own (EOS, stop string, or length) while the others go on.
Positions count only a row's real tokens, so a padded row computes what it would alone: batched == unbatched.

Text lives at the edges. The decode loop speaks token ids; `StopChecker` turns one row's ids into text deltas
incrementally: it never splits a multi-byte UTF-8 character across deltas (tokens are bytes, a character can span
two tokens), it finds stop strings that span token boundaries, and it holds back text that might be the start of a
stop string so the stop text itself is never emitted.

Public API (what `lmforge.lm.LM` delegates to):
    generate(lm, "Once upon", max_new_tokens=50, temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=0) -> str
    generate(lm, ["a", "b"], ...) -> list[str]             (one left-padded batch)
    stream(lm, prompt, ...) -> iterator of text deltas
    chat(lm, [{"role": "user", "content": "Hi"}], ...) -> str
    score(lm, prompt, continuation) -> Score(logprob=sum, token_logprobs=[...])
Lower level, for the serving engine: `SamplingParams`, `sample_next_token`, `StopChecker`, `generate_ids`,
`token_logprobs`. Speed: `generate(..., compile=True)` decodes through a static-shape step compiled with
torch.compile (`StaticDecoder`, at the end of the decode-loop section).

References: Holtzman et al. 2020 (top-p / nucleus sampling); Keskar et al. 2019 (CTRL, repetition penalty);
OpenAI API docs (frequency/presence penalties); Nguyen et al. 2024 (min-p); gpt-fast and nanochat's engine (shape).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .errors import GenerationError
from .model import apply_rope

# ================================================================================================================
# Sampling controls
# ================================================================================================================


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
        from .utils import check_seed

        check_seed(self.seed, error=GenerationError)  # an int torch can seed with (the server answers 400)
        if any(not isinstance(s, str) for s in self.stop):
            raise GenerationError(f"stop must be a string or a list of strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or top_k=1) leaves one candidate: no randomness is drawn at all."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return bool((self.repetition_penalty not in (None, 1.0)) or self.frequency_penalty or self.presence_penalty)


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


# ================================================================================================================
# Text at the edges: incremental detokenization and stop strings
# ================================================================================================================


class StopChecker:
    """Follows one sequence's generated tokens and turns them into safe-to-show text deltas.

        checker = StopChecker(tok, stop=["\\n\\n"], stop_token_ids=[eos], context_ids=prompt_ids)
        for tok_id in ...: delta = checker.push(tok_id); show(delta); if checker.finished: break
        show(checker.flush())

    Tokens are bytes. A token's bytes are found by decoding it after a few context tokens and cutting the context's
    bytes off (SentencePiece-style decoders drop a leading space at the very start of a text, so a token decoded
    alone can lose its space). Bytes go through an incremental UTF-8 decoder, which holds back an unfinished
    multi-byte character until its last byte arrives. Stop strings are searched in the whole text so far, so one
    split over several tokens is found; text that could still become a stop string is held back.
    `finish_reason` is "stop" (stop token or string) or "length" (set by the caller through `flush`).
    """

    CONTEXT = 4  # tokens of left context used to decode each new token

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stop_token_ids = set(stop_token_ids)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._context = list(context_ids)[-self.CONTEXT:]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []  # generated tokens, stop token excluded
        self._text = ""  # all text decoded so far
        self.emitted = 0  # characters of _text already handed out
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None  # the stop string or token id that ended generation
        self.logprobs: list[float] | None = None  # filled by the decode loop when asked for
        self.top_logprobs: list[dict[int, float]] | None = None

    @property
    def text(self) -> str:
        """The completion so far as it will be returned (held-back text excluded)."""
        return self._text[:self.emitted]

    def _token_bytes(self, token_id: int) -> bytes:
        if self.tokenizer is None:
            return b""
        ctx = self._context
        if not ctx:
            data = self.tokenizer.decode_bytes([token_id])
        else:
            before = self.tokenizer.decode_bytes(ctx)
            both = self.tokenizer.decode_bytes(ctx + [token_id])
            data = both[len(before):] if both.startswith(before) else self.tokenizer.decode_bytes([token_id])
        self._context = (ctx + [token_id])[-self.CONTEXT:]
        return data

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new text that is safe to show (may be "")."""
        if self.finished:
            return ""
        if token_id in self.stop_token_ids:
            self.finished, self.finish_reason, self.stop_reason = True, "stop", token_id
            return self.flush_utf8()
        self.token_ids.append(token_id)
        start = max(0, len(self._text) - self._max_stop + 1) if self.stop else len(self._text)
        self._text += self._utf8.decode(self._token_bytes(token_id))
        if self.stop:
            hit = self._find_stop(start)
            if hit is not None:
                pos, s = hit
                self._text = self._text[:pos]
                self.finished, self.finish_reason, self.stop_reason = True, "stop", s
                return self._emit(len(self._text))
            return self._emit(len(self._text) - self._partial_stop_suffix())
        return self._emit(len(self._text))

    def flush(self, finish_reason: str = "length") -> str:
        """End of generation without a stop: emit everything held back (an unfinished character becomes U+FFFD)."""
        if not self.finished:
            self.finished, self.finish_reason = True, finish_reason
        return self.flush_utf8()

    def flush_utf8(self) -> str:
        if self.finish_reason == "stop" and self.stop_reason in self.stop:
            return ""
        self._text += self._utf8.decode(b"", final=True)
        if self.stop:  # the tail could complete a stop string only with bytes that never came
            hit = self._find_stop(max(0, self.emitted - self._max_stop + 1))
            if hit is not None:
                self._text = self._text[:hit[0]]
                self.finish_reason, self.stop_reason = "stop", hit[1]
        return self._emit(len(self._text))

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """Earliest occurrence of any stop string at or after `start` (only new text can hold a new match)."""
        best = None
        for s in self.stop:
            i = self._text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the text that is a proper prefix of a stop string (must be held back)."""
        text, n = self._text, 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), n, -1):
                if text.endswith(s[:k]):
                    n = k
                    break
        return n

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self._text[self.emitted:upto]
        self.emitted = upto
        return delta


# ================================================================================================================
# The decode loop (token ids only)
# ================================================================================================================


class Completion(str):
    """The generated text (a `str`), carrying the details: token_ids, logprobs, top_logprobs, finish_reason.

    finish_reason: "stop" (EOS, stop token or stop string) or "length" (max_new_tokens or the context window).
    logprobs[i] is log p(token_ids[i] | everything before) under the model itself (before any sampling control);
    top_logprobs[i] is a {token_id: logprob} dict of the most likely alternatives at that step.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str
    stop_reason: str | int | None
    prompt_tokens: int

    def __new__(cls, text: str, token_ids=(), logprobs=None, top_logprobs=None, finish_reason="length",
                stop_reason=None, prompt_tokens=0):
        obj = super().__new__(cls, text)
        obj.token_ids, obj.logprobs, obj.top_logprobs = list(token_ids), logprobs, top_logprobs
        obj.finish_reason, obj.stop_reason, obj.prompt_tokens = finish_reason, stop_reason, prompt_tokens
        return obj

    @property
    def text(self) -> str:
        return str(self)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Inference without dropout; the model's train/eval state is restored after (autograd is switched off by the
    decode loop itself, around its own work only)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5, 6, 7], [8]] -> ids [[5, 6, 7], [p, p, 8]], mask [[1, 1, 1], [0, 0, 1]]: every row ends at column T-1."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def decode_steps(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 checkers: Sequence[StopChecker], *, use_cache: bool = True, pad_id: int = 0,
                 generators: Sequence[torch.Generator] | None = None,
                 max_len: int | None = None, compile: bool | str = False,
                 static: bool | None = None) -> Iterator[list[tuple[int, str]]]:
    """The generation loop over token ids. Yields, after each step, the (row, text delta) pairs of that step.

    prompts: token id lists (B rows, any lengths >= 1); one `StopChecker` per row records tokens, logprobs and
    decides when the row is finished. `max_len` caps prompt + generated tokens (the context window).
    Finished rows keep being fed a padding token (their cache rows are simply ignored) until all rows are done.
    compile: decode steps run through `torch.compile` (`StaticDecoder`; a string is the torch.compile mode);
    static: use the static-shape step without compiling (None: only when compiling). Prefill is always eager.
    """
    B = len(prompts)
    if B == 0:
        return
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("empty prompt: there is no token to condition on (give text, or a model with BOS)")
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    ids, mask = _left_pad(prompts, pad_id, device)  # (B, T), (B, T)
    T = ids.shape[1]
    # each row may generate max_new_tokens, but never past the context window (learned positions end there)
    steps_row = [params.max_new_tokens if max_len is None else min(params.max_new_tokens, max_len - len(p))
                 for p in prompts]
    steps = max(steps_row)
    if steps <= 0:
        for c in checkers:
            c.flush("length")
        return
    if generators is None and not params.greedy:
        generators = make_generators(params.seed, B, device)
    seen = output_counts = None
    if params.repetition_penalty not in (None, 1.0):
        seen = token_counts(prompts, vocab_size, device) > 0  # (B, V)
    if params.frequency_penalty or params.presence_penalty:
        output_counts = torch.zeros(B, vocab_size, dtype=torch.long, device=device)  # (B, V)

    alive = [True] * B
    for i, n in enumerate(steps_row):
        if n <= 0:  # this row's prompt already fills the context window
            checkers[i].flush("length")
            alive[i] = False
    decoder = None
    if use_cache and (compile or static) and supports_static_decode(model):
        decoder = static_decoder(model, compile=bool(compile), mode=compile if isinstance(compile, str) else None)
    padded = not bool(mask.all())
    cache = None
    if use_cache:
        if decoder is None:  # a left-padded batch never takes the dense one-token step: no decode weights for it
            cache = model.new_cache(B, T + steps, fused=not padded)
        else:  # the static step keeps per-row lengths: no dense fused steps, so no fused copies
            cache = model.new_cache(B, decoder.cache_len(T + steps), fused=False)
    valid = torch.ones(B, dtype=torch.bool, device=device) if decoder is not None else None  # (B,) alive rows

    def feed_step(next_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """Feed each row's new token; (B, V) logits of the next position. Runs inside inference mode."""
        nonlocal ids, mask, valid
        if seen is not None:
            seen[torch.arange(B, device=device), next_ids] = True
        if output_counts is not None:
            output_counts[torch.arange(B, device=device), next_ids] += 1
        if all(alive):
            feed, feed_mask = next_ids[:, None], None  # (B, 1)
        else:  # a finished row's token is padding: it takes no position and no other token sees it
            feed = torch.tensor([t if alive[i] else pad_id for i, t in enumerate(tokens)], device=device)[:, None]
            feed_mask = torch.tensor(alive, dtype=torch.long, device=device)[:, None]
        if decoder is not None:  # static shapes: one (compiled) graph for every step
            if feed_mask is not None:
                valid = torch.tensor(alive, dtype=torch.bool, device=device)
            return decoder.step(feed, valid, cache)  # (B, 1) -> (B, V)
        if use_cache:
            return model(feed, attention_mask=feed_mask, kv_cache=cache)[:, -1]  # decode: (B, 1) -> (B, V)
        # reference path: re-run the whole (left-padded) sequence every step
        ids = torch.cat([ids, feed], dim=1)  # (B, T + step + 1)
        mask = torch.cat([mask, torch.ones_like(feed) if feed_mask is None else feed_mask], dim=1)
        return model(ids, attention_mask=mask, logits_to_keep=1)[:, -1]

    # inference mode only around the work, never across a `yield` (it would leak into the caller's code)
    for step in range(steps):
        # one inference-mode block per step (entering one costs microseconds, which count at ~2 ms a token):
        # feed the previous step's tokens (or prefill the prompt), then pick the next token of each row
        with torch.inference_mode():
            if step == 0:  # prefill; with no padding the model may use its causal fast path
                logits = model(ids, attention_mask=mask if padded else None, kv_cache=cache,
                               logits_to_keep=1)[:, -1]  # (B, V)
            else:
                logits = feed_step(next_ids, tokens)
            next_ids = sample_next_token(logits, params, generators, seen, output_counts)  # (B,)
            if params.logprobs:
                logp = logits.float().log_softmax(dim=-1)  # (B, V) the model's own distribution
                chosen = logp.gather(1, next_ids[:, None])[:, 0].tolist()
                if params.top_logprobs:
                    top = torch.topk(logp, params.top_logprobs, dim=-1)
                    top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        tokens = next_ids.tolist()
        events = []
        for i, t in enumerate(tokens):
            if not alive[i]:
                continue
            c = checkers[i]
            n_before = len(c.token_ids)
            delta = c.push(t)
            if params.logprobs and len(c.token_ids) > n_before:  # a stop token is not part of the output
                c.logprobs.append(chosen[i])
                if params.top_logprobs:
                    c.top_logprobs.append(dict(zip(top_ids[i], top_vals[i])))
            if not c.finished and step + 1 >= steps_row[i]:
                delta += c.flush("length")
            if c.finished:
                alive[i] = False
            if delta or c.finished:
                events.append((i, delta))
        yield events
        if not any(alive):
            return


def generate_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 tokenizer=None, *, use_cache: bool = True, pad_id: int = 0,
                 max_len: int | None = None, compile: bool | str = False,
                 static: bool | None = None) -> list[Completion]:
    """Generate for a batch of tokenized prompts; returns one `Completion` per prompt (text is "" without a
    tokenizer). Stop strings need a tokenizer; stop token ids do not. compile/static: see `decode_steps`."""
    checkers = [_new_checker(tokenizer, params, p) for p in prompts]
    with _eval_mode(model):
        for _ in decode_steps(model, prompts, params, checkers, use_cache=use_cache, pad_id=pad_id,
                              max_len=max_len, compile=compile, static=static):
            pass
    return [_completion(c, len(p)) for c, p in zip(checkers, prompts)]


def _new_checker(tokenizer, params: SamplingParams, prompt_ids: Sequence[int]) -> StopChecker:
    if params.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer")
    stop_ids = [] if params.ignore_eos else params.stop_token_ids
    c = StopChecker(tokenizer, params.stop, stop_ids, context_ids=prompt_ids)
    c.logprobs = [] if params.logprobs else None
    c.top_logprobs = [] if params.top_logprobs else None
    return c


def _completion(c: StopChecker, prompt_tokens: int) -> Completion:
    return Completion(c.text, c.token_ids, c.logprobs, c.top_logprobs, c.finish_reason or "length",
                      c.stop_reason, prompt_tokens)


# ================================================================================================================
# The fast path: a static-shape decode step (one graph for every step, optionally compiled)
# ================================================================================================================
#
# Why eager decoding is slow for small models: a decode step of stories260K is ~300 tiny ops (norms, projections,
# rope, attention per layer), each costing a few microseconds of Python and dispatcher overhead while its actual
# arithmetic takes less. The cure (gpt-fast, Fu et al. 2023) is to hand the whole step to a compiler that fuses
# the elementwise work into a few loops and drops the per-op overhead. A compiler needs the step to look the same
# every time, so the step is written with *static shapes*:
#
#     input ids      (B, 1)                  always one new token per row
#     keys/values    (B, nkv, max_len, hd)   the whole pre-allocated cache, not the first S slots of it
#     mask           (B, 1, 1, max_len)      the cache's `key_mask` (slots written so far): unwritten slots are
#                                            masked out, so attending over all max_len slots == attending over S
#     rope cos/sin   table[position]         a (max_positions, hd) table computed once, indexed per step
#
# Nothing depends on Python integers read back from tensors (no `int(lengths.max())`), so one compiled graph
# (`torch.compile(fullgraph=True, dynamic=False)`) serves every step of every request with the same (B, max_len).
# The cache size is rounded up to a multiple of `STATIC_BUCKET` so requests of similar length share a graph.
# Prefill (T new tokens at once) stays in the eager model: it runs once per request.

STATIC_BUCKET = 128  # cache sizes are rounded up to this, so few distinct shapes (graphs) exist


def static_decode_step(model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor, k_all: torch.Tensor,
                       v_all: torch.Tensor, key_mask: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor,
                       cos_table: torch.Tensor | None, sin_table: torch.Tensor | None) -> torch.Tensor:
    """One decode step with shapes that never change: (B, 1) ids -> (B, V) logits; updates the cache in place.

    ids (B, 1) the new token of each row; valid (B,) bool, False for a finished row fed padding (it takes no
    position and no later token sees it). k_all/v_all (n_layer, B, nkv, S, hd), key_mask (B, S), lengths (B,),
    positions (B,) are a `KVCache`'s tensors, updated exactly as `Transformer.forward(kv_cache=...)` updates them.
    """
    cfg = model.config
    B = ids.shape[0]
    S = key_mask.shape[1]
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    slot = lengths  # (B,) the slot each row writes this step
    slots = torch.arange(S, device=ids.device)[None, :]  # (1, S)
    key_mask.scatter_(1, slot[:, None], valid[:, None])
    here = slots == slot[:, None]  # (B, S)
    mask = key_mask & (slots <= slot[:, None])  # (B, S) real tokens up to this one
    if cfg.sliding_window:
        mask = mask & (slots > slot[:, None] - cfg.sliding_window)
    mask = (mask | here)[:, None, None, :]  # (B, 1, 1, S); a padding query sees only itself (no NaN)
    pos = positions[:, None]  # (B, 1) position of the new token
    x = model.wte(ids)  # (B, 1, C)
    if model.wpe is not None:
        x = x + model.wpe(pos)
        cos = sin = None
    else:
        cos, sin = cos_table[pos][:, None], sin_table[pos][:, None]  # (B, 1, 1, hd)
    rows = torch.arange(B, device=ids.device)[:, None]  # (B, 1)
    heads = torch.arange(nkv, device=ids.device)[None, :]  # (1, nkv)
    slot_idx = slot[:, None]  # (B, 1)
    gqa = {"enable_gqa": True} if nkv != nh else {}
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm_1(x)
        q = attn.q_proj(h).view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
        k = attn.k_proj(h).view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
        v = attn.v_proj(h).view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # one index_put_ on the whole cache tensor (not a scatter into a per-layer view, which the compiler turns
        # into a copy of the whole cache per layer): write k/v at [layer i, row b, head h, slot[b]]
        where = (torch.full((), i, dtype=torch.long, device=ids.device), rows, heads, slot_idx)
        k_all.index_put_(where, k[:, :, 0].to(k_all.dtype))  # values (B, nkv, hd)
        v_all.index_put_(where, v[:, :, 0].to(v_all.dtype))
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k_all[i].to(q.dtype), v_all[i].to(q.dtype), attn_mask=mask, **gqa)  # (B, nh, 1, hd)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, 1, nh * hd))
        x = x + block.mlp(block.norm_2(x))
    lengths.add_(1)
    positions.add_(valid.long())
    return model.lm_head(model.norm_f(x))[:, -1]  # (B, V)


class StaticDecoder:
    """Runs `static_decode_step` for one model, eagerly or compiled; compiled graphs are kept per (B, max_len).

        dec = StaticDecoder(model, compile=True)
        cache = model.new_cache(B, dec.cache_len(T + steps)); model(prompt, kv_cache=cache)   # eager prefill
        logits = dec.step(next_ids, valid, cache)                                               # (B, V)

    compile=True costs a one-time compile (seconds for a tiny model, about a minute or more for a 124M model on a
    slow CPU; a C++ compiler is needed for torch.compile on CPU). `mode` is passed to torch.compile.
    """

    def __init__(self, model: torch.nn.Module, compile: bool = False, mode: str | None = None):
        # only a weak reference to the model: decoders are kept in a WeakKeyDictionary keyed by the model, and a
        # strong one would keep every model that ever generated alive
        self._model = weakref.ref(model)
        self.compiled = compile
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        ref = self._model

        def fn(*tensors):
            return static_decode_step(ref(), *tensors)

        self._fn = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode) if compile else fn

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def cache_len(self, needed: int) -> int:
        """The cache size to allocate for `needed` slots: rounded up to STATIC_BUCKET, at most the context window."""
        bs = self.model.config.block_size
        return max(needed, min(bs, -(-needed // STATIC_BUCKET) * STATIC_BUCKET))

    def _rope(self, n: int):
        if self.model.wpe is not None:
            return None, None
        if self._table is None or self._table[0].shape[0] < n:
            size = self.cache_len(n)  # a fixed size per cache size: the compiled graph sees stable shapes
            cos, sin = self.model.rope_table(size, self.model.wte.weight.dtype)
            self._table = (cos[:size], sin[:size])
        return self._table

    def step(self, ids: torch.Tensor, valid: torch.Tensor, cache) -> torch.Tensor:
        """(B, 1) ids, (B,) bool valid -> (B, V) logits; the cache gains one slot per row."""
        cos, sin = self._rope(cache.max_len)
        cache.dense_len = None  # the step keeps per-row lengths only
        args = (ids, valid, cache.k, cache.v, cache.key_mask, cache.lengths, cache.positions, cos, sin)
        if not self.compiled:
            return self._fn(*args)
        try:
            return self._fn(*args)
        except Exception as e:  # e.g. no C++ compiler for Inductor: one line, and how to run without it
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise GenerationError(f"torch.compile of the decode step failed ({type(e).__name__}: {first}); "
                                  f"generate without compile=True") from e


_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def static_decoder(model: torch.nn.Module, compile: bool = False, mode: str | None = None) -> StaticDecoder:
    """The model's StaticDecoder (kept with the model, so compiled graphs are reused across generate calls)."""
    per_model = _DECODERS.setdefault(model, {})
    key = (compile, mode)
    if key not in per_model:
        per_model[key] = StaticDecoder(model, compile=compile, mode=mode)
    return per_model[key]


def supports_static_decode(model: torch.nn.Module) -> bool:
    """The static step needs lmforge's Transformer (not a wrapper with a different forward, e.g. a fake)."""
    from .model import Transformer

    return type(model).forward is Transformer.forward and isinstance(model, Transformer)


# ================================================================================================================
# Text-level API over an `LM` (model + tokenizer + defaults)
# ================================================================================================================

_RUN_OPTIONS = ("truncate", "use_cache", "compile", "static")


def resolve_params(lm, controls: dict[str, Any]) -> SamplingParams:
    """Defaults from `lm.generation_config`, overridden by keyword controls; EOS ids added to stop_token_ids."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    bad = [k for k in controls if k not in names and k not in _RUN_OPTIONS]
    if bad:
        import difflib

        close = difflib.get_close_matches(bad[0], sorted(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise GenerationError(f"unknown generation control {bad[0]!r}{hint}")
    gc = getattr(lm, "generation_config", None)
    base: dict[str, Any] = {}
    if gc is not None:
        for name in names:
            if hasattr(gc, name) and getattr(gc, name) is not None:
                base[name] = getattr(gc, name)
    for k, v in controls.items():
        if k in names and v is not None:
            base[k] = v
    for k in ("stop", "stop_token_ids"):
        if isinstance(base.get(k), (str, int)):
            base[k] = [base[k]]
        base[k] = list(base.get(k) or [])
    eos = eos_token_ids(lm)
    base["stop_token_ids"] = base["stop_token_ids"] + [e for e in eos if e not in base["stop_token_ids"]]
    return SamplingParams(**base)


def eos_token_ids(lm) -> list[int]:
    gc = getattr(lm, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(lm.tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def encode_text(tok, text: str) -> list[int]:
    """Text -> ids with special-token text (e.g. "<|endoftext|>") read as the special token, as Hugging Face
    tokenizers do for prompts: the prompt's author controls the whole context in a completion API."""
    try:
        return list(tok.encode(text, allowed_special="all"))
    except TypeError:  # a tokenizer without tiktoken-style special-token control
        return list(tok.encode(text))


def encode_prompt(lm, prompt: str | Sequence[int], *, add_bos: bool | None = None) -> list[int]:
    """Text -> ids, with BOS prepended when the tokenizer says the model expects it (Llama, llama2.c).
    A list of ints is taken as already tokenized."""
    if not isinstance(prompt, str):
        if not all(isinstance(t, int) for t in prompt):
            raise GenerationError("a prompt must be a string or a list of token ids")
        return list(prompt)
    tok = lm.tokenizer
    if tok is None:
        raise GenerationError("this model has no tokenizer: pass the prompt as a list of token ids")
    ids = encode_text(tok, prompt)
    if add_bos is None:
        add_bos = bool(getattr(tok, "add_bos_token", False))
    bos = getattr(tok, "bos_token_id", None)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def _fit_context(ids: list[int], block_size: int, truncate: bool) -> list[int]:
    """A prompt must leave room for at least one new token. Too long: error, or keep its end with truncate=True."""
    if len(ids) < block_size:
        return ids
    if not truncate:
        raise GenerationError(f"prompt is {len(ids)} tokens but the context window is {block_size}; shorten it "
                              f"or pass truncate=True to keep its last {block_size - 1} tokens")
    return ids[-(block_size - 1):]


def _prepare(lm, prompts: Sequence[str | Sequence[int]], controls: dict[str, Any], add_bos: bool | None = None):
    params = resolve_params(lm, controls)
    truncate = bool(controls.get("truncate", False))
    block_size = lm.model.config.block_size
    ids = [_fit_context(encode_prompt(lm, p, add_bos=add_bos), block_size, truncate) for p in prompts]
    tok = lm.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None)
    return params, ids, (pad if pad is not None else 0), block_size


def _is_batch(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)


def generate(lm, prompt: str | Sequence[int] | Sequence[str], **controls: Any) -> str | list[str]:
    """Complete one prompt (-> str) or a list of prompts (-> list[str], generated as one left-padded batch).

    Controls: see `SamplingParams` (max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
    frequency_penalty, presence_penalty, stop, stop_token_ids, seed, logprobs, top_logprobs, ignore_eos), plus
    truncate=True (keep the end of a too-long prompt), use_cache=False (reference path), compile=True (decode
    steps through torch.compile: a one-time compile, then faster steps; see `StaticDecoder`) and static=True (the
    same static-shape step, not compiled). Defaults come from
    `lm.generation_config`. The returned strings are `Completion`s: `.token_ids`, `.logprobs`, `.finish_reason`.
    """
    batch = _is_batch(prompt)
    prompts = list(prompt) if batch else [prompt]
    if batch and not all(isinstance(p, str) or (isinstance(p, (list, tuple))) for p in prompts):
        raise GenerationError("prompts must be strings or lists of token ids")
    params, ids, pad, block_size = _prepare(lm, prompts, controls)
    outs = generate_ids(lm.model, ids, params, lm.tokenizer, use_cache=controls.get("use_cache", True),
                        pad_id=pad, max_len=block_size, compile=controls.get("compile") or False,
                        static=controls.get("static"))
    return outs if batch else outs[0]


def stream(lm, prompt: str | Sequence[int], **controls: Any) -> Iterator[str]:
    """Yield the completion as text deltas, as soon as they are safe to show (whole characters, no stop text).
    `"".join(stream(lm, p, **c)) == generate(lm, p, **c)`."""
    if _is_batch(prompt):
        raise GenerationError("stream() takes one prompt; use generate() for a list")
    params, ids, pad, block_size = _prepare(lm, [prompt], controls)
    return _stream_ids(lm, ids, params, pad, block_size, controls.get("use_cache", True),
                       controls.get("compile") or False, controls.get("static"))


def _stream_ids(lm, ids, params, pad, block_size, use_cache, compile=False, static=None) -> Iterator[str]:
    checker = _new_checker(lm.tokenizer, params, ids[0])
    with _eval_mode(lm.model):
        for events in decode_steps(lm.model, ids, params, [checker], use_cache=use_cache, pad_id=pad,
                                   max_len=block_size, compile=compile, static=static):
            for _, delta in events:
                if delta:
                    yield delta


def chat_prompt(lm, messages: Sequence[dict], *, add_generation_prompt: bool = True, tools=None, **kwargs) -> str:
    """Render messages with the model's chat template (ChatML when it has none)."""
    from .chat_template import apply_chat_template

    tok = lm.tokenizer
    bos = getattr(tok, "bos_token", None) or _token_text(tok, getattr(tok, "bos_token_id", None))
    eos = getattr(tok, "eos_token", None) or _token_text(tok, getattr(tok, "eos_token_id", None))
    return apply_chat_template(messages, lm.chat_template, add_generation_prompt=add_generation_prompt,
                               bos_token=bos, eos_token=eos, tools=tools, **kwargs)


def _token_text(tok, token_id: int | None) -> str:
    if token_id is None:
        return ""
    for text, i in (getattr(tok, "special_tokens", None) or {}).items():
        if i == token_id:
            return text
    return tok.decode([token_id])


def chat_controls(lm, controls: dict[str, Any]) -> dict[str, Any]:
    """Stop at the template's end-of-turn marker: as a token id when it is a special token, else as a string."""
    from .chat_template import end_of_turn_markers

    controls = dict(controls)
    specials = getattr(lm.tokenizer, "special_tokens", None) or {}
    stop = list(controls.get("stop") or lm.generation_config.stop or [])
    stop_ids = list(controls.get("stop_token_ids") or lm.generation_config.stop_token_ids or [])
    for marker in end_of_turn_markers(lm.chat_template):
        if marker in specials:
            stop_ids.append(specials[marker])
        elif marker not in stop:
            stop.append(marker)
    controls["stop"], controls["stop_token_ids"] = stop, stop_ids
    return controls


def encode_chat(lm, text: str) -> list[int]:
    """Chat prompts are tokenized with special tokens recognised and without adding BOS (the template did)."""
    if lm.tokenizer is None:
        raise GenerationError("this model has no tokenizer, so it cannot chat")
    return encode_text(lm.tokenizer, text)


def chat(lm, messages: Sequence[dict], tools: list[dict] | None = None, **controls: Any) -> str:
    """Answer the conversation: the assistant's next message as text (stops at the end-of-turn marker)."""
    text = chat_prompt(lm, messages, tools=tools)
    controls = chat_controls(lm, controls)
    return generate(lm, encode_chat(lm, text), **controls)


def chat_stream(lm, messages: Sequence[dict], tools: list[dict] | None = None, **controls: Any) -> Iterator[str]:
    """`chat` as text deltas (for terminals and servers)."""
    text = chat_prompt(lm, messages, tools=tools)
    return stream(lm, encode_chat(lm, text), **chat_controls(lm, controls))


# ================================================================================================================
# Scoring: log-likelihood of a given continuation
# ================================================================================================================


@dataclass
class Score:
    """log p(continuation | prompt) = sum of per-token log-probs; `is_greedy`: each token was the argmax."""

    logprob: float
    token_logprobs: list[float]
    token_ids: list[int]
    is_greedy: bool

    def __iter__(self):  # `total, per_token = lm.score(...)`
        return iter((self.logprob, self.token_logprobs))


def token_logprobs(model: torch.nn.Module, sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None,
                   top_logprobs: int = 0, batch_size: int = 16):
    """Per-token log-probs of sequences under the model, batched (right padding: with a causal mask, padding at
    the end cannot change earlier positions).

    For each sequence s and each position j >= start (start >= 1), returns log p(s[j] | s[:j]), plus whether s[j]
    was the argmax, plus the top alternatives when top_logprobs > 0. Returns a list of
    (logprobs: list[float], greedy: list[bool], top: list[dict[int, float]] | None).
    Used by `score` and by the server's `echo` + `logprobs`.
    """
    starts = list(starts) if starts is not None else [1] * len(sequences)
    device = next(model.parameters()).device
    results = []
    with _eval_mode(model), torch.inference_mode():
        for b in range(0, len(sequences), batch_size):
            chunk, chunk_starts = sequences[b:b + batch_size], starts[b:b + batch_size]
            L = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), L, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.as_tensor(list(s))
            ids = ids.to(device)
            logp = model(ids).float().log_softmax(dim=-1)  # (b, L, V): position j predicts token j+1
            for i, (s, st) in enumerate(zip(chunk, chunk_starts)):
                if st < 1:
                    raise GenerationError("the first token has no context to be scored from")
                targets = torch.as_tensor(list(s[st:]), device=device)  # (n,)
                lp = logp[i, st - 1:len(s) - 1]  # (n, V)
                picked = lp.gather(1, targets[:, None])[:, 0]
                greedy_ok = (lp.argmax(dim=-1) == targets).tolist()
                top = None
                if top_logprobs:
                    tv = torch.topk(lp, top_logprobs, dim=-1)
                    top = [dict(zip(ti, tvv)) for ti, tvv in zip(tv.indices.tolist(), tv.values.tolist())]
                results.append((picked.tolist(), greedy_ok, top))
    return results


def _encode_pair(lm, prompt: str | Sequence[int], continuation: str | Sequence[int]) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, continuation), split the way lm-evaluation-harness does it.

    Text is tokenized as one string and cut where the prompt's own tokens end: tokenizers that add a leading space
    to a text (SentencePiece) or merge across the boundary would otherwise score tokens the model never sees in
    the running text. Trailing spaces of the prompt move to the continuation ("Paris is" + " nice").
    Token-id lists are used as given.
    """
    if not isinstance(prompt, str) or not isinstance(continuation, str):
        ctx = encode_prompt(lm, prompt)
        cont = encode_prompt(lm, continuation, add_bos=False) if not isinstance(continuation, str) \
            else encode_text(lm.tokenizer, continuation)
        return ctx, cont
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        prompt, continuation = prompt[:-n_spaces], prompt[-n_spaces:] + continuation
    ctx = encode_prompt(lm, prompt)
    whole = encode_prompt(lm, prompt + continuation)
    return whole[:len(ctx)], whole[len(ctx):]


def score_batch(lm, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> list[Score]:
    """`score` for many (prompt, continuation) pairs in batched forwards (multiple-choice evaluation)."""
    seqs, starts = [], []
    block_size = lm.model.config.block_size
    tok = lm.tokenizer
    for prompt, continuation in pairs:
        ctx, cont = _encode_pair(lm, prompt, continuation)
        if not cont:
            raise GenerationError("continuation to score is empty")
        if not ctx:  # nothing to condition the first token on: use the document separator, as lm-eval does
            sep = getattr(tok, "bos_token_id", None)
            sep = sep if sep is not None else getattr(tok, "eos_token_id", None)
            if sep is None:
                raise GenerationError("empty prompt and the tokenizer has neither BOS nor EOS to start from")
            ctx = [sep]
        if len(cont) >= block_size:
            raise GenerationError(f"continuation is {len(cont)} tokens; the context window is {block_size}")
        ctx = ctx[-(block_size - len(cont)):]  # keep the end of a long prompt (lm-eval's left truncation)
        seqs.append(ctx + cont)
        starts.append(len(ctx))
    out = []
    for (lps, greedy_ok, _), seq, st in zip(token_logprobs(lm.model, seqs, starts, batch_size=batch_size),
                                            seqs, starts):
        out.append(Score(logprob=float(sum(lps)), token_logprobs=lps, token_ids=list(seq[st:]),
                         is_greedy=all(greedy_ok)))
    return out


def score(lm, prompt: str, continuation: str) -> Score:
    """log p(continuation | prompt): the sum and the per-token log-probs (the text is tokenized as a whole and split
    where the prompt's tokens end, as lm-evaluation-harness does; BOS first when the model expects it)."""
    return score_batch(lm, [(prompt, continuation)])[0]


