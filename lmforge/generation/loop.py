"""The decode loop: token ids in, token ids out, for a batch of prompts; and scoring a given continuation.

Decoding with a KV cache. Attention at step t needs the keys and values of every earlier token; they never change,
so we compute the prompt's once ("prefill", one forward over T tokens) and then feed a single new token per step
("decode"), appending its k/v to a pre-allocated `KVCache` (lmforge.models.decoder). Without the cache each step re-runs the
whole sequence: O(T^2) work instead of O(T). `use_cache=False` keeps that slow path as the reference the tests
compare against.

Batches. Prompts of different lengths are left-padded into one (B, T) tensor with an attention mask, so every row's
last column is its newest token; each row stops on its own (EOS, stop string, or length) while the others go on.
Positions count only a row's real tokens, so a padded row computes what it would alone: batched == unbatched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lmforge.errors import GenerationError
from lmforge.generation import constrain, decode
from lmforge.generation.sampling import SamplingParams, make_generators, sample_next_token, token_counts
from lmforge.generation.stops import StopChecker


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
                 static: bool | None = None, constraints: Sequence | None = None) -> Iterator[list[tuple[int, str]]]:
    """The generation loop over token ids. Yields, after each step, the (row, text delta) pairs of that step.

    prompts: token id lists (B rows, any lengths >= 1); one `StopChecker` per row records tokens, logprobs and
    decides when the row is finished. `max_len` caps prompt + generated tokens (the context window).
    Finished rows keep being fed a padding token (their cache rows are simply ignored) until all rows are done.
    compile: decode steps run through `torch.compile` (`decode.Decoder`; a string is the torch.compile mode);
    static: run the eager step with the compiled step's static shapes (whole cache, masked; a check of what
    compile runs). Prefill is always the model's forward. constraints: one `TokenConstraint` per row (JSON mode,
    `constrain.request_constraints`): each row draws only allowed tokens and ends ("stop") when its document is
    complete; it acts on the logits after the step, so it works with every step above.
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
    # the one-token decode step (lmforge.generation.decode), compiled or eager; None: the model's forward decodes
    decoder = decode.decoder_for(model, compile=bool(compile), mode=compile if isinstance(compile, str) else None) \
        if use_cache else None
    padded = not bool(mask.all())
    cache = None
    if use_cache:
        if decoder is not None:
            decoder.begin()  # may re-lay a large model's weights out, once
        needed = T + steps
        cache = model.new_cache(B, needed if decoder is None else decoder.cache_len(needed))
    valid = torch.ones(B, dtype=torch.bool, device=device)  # (B,) alive rows
    window = model.config.sliding_window if decoder is not None else None

    def feed_step(next_ids: torch.Tensor, tokens: list[int], step: int) -> torch.Tensor:
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
            valid = feed_mask[:, 0].bool()
        if decoder is not None:
            if static or decoder.compiled:  # static shapes: one (compiled) graph for every step
                return decoder.step(feed, valid, cache)  # (B, 1) -> (B, V)
            span = T + step  # every row has written T + step - 1 slots; this token takes the next one
            dense = not padded and feed_mask is None and not (window and span > window)
            return decoder.step(feed, valid, cache, span=span, dense=dense)
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
                logits = feed_step(next_ids, tokens, step)
            if constraints is None:
                next_ids = sample_next_token(logits, params, generators, seen, output_counts)  # (B,)
            else:  # JSON mode: allowed tokens only; None where a row's constraint allows nothing
                picked = constrain.next_tokens(logits, params, generators, constraints, alive, seen, output_counts)
                next_ids = torch.tensor([pad_id if t is None else t for t in picked], device=device)  # (B,)
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
            if constraints is not None and picked[i] is None:  # nothing may follow: the document is over
                alive[i] = False
                events.append((i, c.flush("stop")))
                continue
            n_before = len(c.token_ids)
            delta = c.push(t)
            if params.logprobs and len(c.token_ids) > n_before:  # a stop token is not part of the output
                c.logprobs.append(chosen[i])
                if params.top_logprobs:
                    c.top_logprobs.append(dict(zip(top_ids[i], top_vals[i])))
            if constraints is not None and not c.finished:
                constraints[i].advance(t)
                if constraints[i].is_complete():  # a whole JSON document: stop here, as the server does
                    delta += c.flush("stop")
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
                 static: bool | None = None, constraints: Sequence | None = None) -> list[Completion]:
    """Generate for a batch of tokenized prompts; returns one `Completion` per prompt (text is "" without a
    tokenizer). Stop strings need a tokenizer; stop token ids do not. compile/static/constraints: see
    `decode_steps`."""
    checkers = [_new_checker(tokenizer, params, p) for p in prompts]
    with _eval_mode(model):
        for _ in decode_steps(model, prompts, params, checkers, use_cache=use_cache, pad_id=pad_id,
                              max_len=max_len, compile=compile, static=static, constraints=constraints):
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
