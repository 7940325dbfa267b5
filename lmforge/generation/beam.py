"""Beam search: keep the `num_beams` most likely partial outputs instead of one, for decoders and encoder-decoders.

Greedy decoding commits to the single most likely token at every step; a slightly less likely token whose
continuation is much more likely is never seen. Sampling draws from the distribution (diverse, not the most likely
text). Beam search approximates the most likely *sequence*: at each step every beam is extended by every token,
each candidate is scored by its total log-probability

    score(y_1..y_t) = sum_i log p(y_i | x, y_<i)

and the best `num_beams` candidates survive. A candidate that ends with EOS (or reaches the length limit) leaves
the running set and joins the finished hypotheses, scored with a length penalty:

    final score = sum of log-probs / (generated length ** length_penalty)

Log-probabilities are negative, so longer outputs sum lower; length_penalty > 0 divides by a growing length and
favours longer outputs, < 0 shorter ones. Search stops when `early_stopping` says so: True, as soon as num_beams
hypotheses are finished; False, when no running beam can still beat the worst finished one if it ended now
(Hugging Face's heuristic); "never", only when that is impossible even at the maximum length.

This is a faithful port of transformers' `_beam_search` (v5), so on the same weights both return the same ids:
per step the top 2 x num_beams candidates (more with several EOS ids) are taken over all beams x vocabulary, the
best non-finished num_beams continue, and finished ones compete with the stored hypotheses. The controls that
apply to beam search are applied to the log-probabilities, in HF's way: `repetition_penalty` (and lmforge's
frequency/presence penalties) through `lmforge.generation.sampling.process_logits`, and `no_repeat_ngram_size`,
which forbids any token that would repeat an n-gram already in the sequence.

A batch of inputs is searched together: B inputs x K beams are B*K model rows (row b*K + k is beam k of input b),
every step is one forward over all of them, and each input keeps its own candidates, finished set and stopping
test (an input that can no longer improve keeps running until the whole batch stops, its finished set frozen).

Beam *sampling* (`do_sample=True`): instead of the 2K best candidates, 2K distinct ones are drawn with
probability proportional to exp(beam score + next log-prob), after temperature, top-k, top-p and min-p shaped
the log-probabilities (each keeping at least 1 + #EOS tokens, so a beam can always go on); the draws are then
sorted by score and the search goes on as above. Scores accumulate the *shaped* log-probs (log p / T), as in
transformers. Each input draws from its own generator seeded with `seed`, so an input samples the same beams alone
or in a batch; with one input the draws are those of `torch.manual_seed(seed)` + transformers 5's `generate`.
(transformers 4 did not sort the draws, so there the first K drawn, not the K best, may finish: its results
differ from v5's and from lmforge's.)

The model plugs in through a *step function*: `step(ids (B*K, T)) -> logits (B*K, V)` feeds the rows' new tokens
(the whole prompt at the first call) into the model's cache and returns the next-token logits, and
`reorder(index (B*K,))` makes row r of the cache a copy of row index[r] (a beam continues its parent's text).
`decoder_beam_search_batch` and `seq2seq_beam_search_batch` build these for lmforge's decoder (`Transformer` +
`KVCache`, prompts left-padded and masked) and T5 (`Seq2SeqCache`, whose cross-attention keys/values are computed
once per input and only copied on reorder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import GenerationError
from lmforge.generation.loop import Completion
from lmforge.generation.sampling import (SamplingParams, apply_temperature, make_generators, min_p_filter,
                                         process_logits, token_counts, top_k_filter, top_p_filter)

NEG = -1.0e9  # HF's "impossible" score (finite, so sums and comparisons stay ordered)


@dataclass
class BeamParams:
    """num_beams: beams kept per input (>= 1); length_penalty: exponent of the length in the final score;
    early_stopping: True | False | "never" (see the module docstring); no_repeat_ngram_size: forbid repeating any
    n-gram of this size (0: off); num_return_sequences: best hypotheses returned per input (<= num_beams);
    do_sample: draw each step's candidates instead of taking the best (beam sampling; the sampling controls
    temperature, top_k, top_p, min_p and seed shape the draw). With one beam, do_sample is not needed: temperature
    decides (0 greedy, > 0 sampling)."""

    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    do_sample: bool = False

    def __post_init__(self):
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise GenerationError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not isinstance(self.num_return_sequences, int) or not 1 <= self.num_return_sequences <= self.num_beams:
            raise GenerationError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], got "
                                  f"{self.num_return_sequences!r}")
        if self.early_stopping not in (True, False, "never"):
            raise GenerationError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise GenerationError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise GenerationError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if not isinstance(self.do_sample, bool):
            raise GenerationError(f"do_sample must be true or false, got {self.do_sample!r}")

    @classmethod
    def pop_from(cls, controls: dict) -> "BeamParams":
        """Take the beam controls out of a dict of generation controls (the rest are SamplingParams')."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: controls.pop(k) for k in names if k in controls and controls[k] is not None})


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens (the EOS that ended it included, as HF returns it)
    score: float  # sum of log-probs / length ** length_penalty


def banned_ngram_tokens(seq: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `seq`.
    >>> sorted(banned_ngram_tokens([1, 2, 3, 1, 2], 3))     # "1 2" was followed by 3 before
    [3]
    """
    if n <= 0 or len(seq) + 1 < n:
        return set()
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix}


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, N, ...) -> t[b, index[b, j], ...] for index (B, M): per-input selection of beams."""
    return t.gather(1, index.view(*index.shape, *[1] * (t.dim() - 2)).expand(*index.shape, *t.shape[2:]))


def warp_log_probs(log_probs: torch.Tensor, params: SamplingParams, min_keep: int) -> torch.Tensor:
    """Beam sampling's filters on log-probabilities, as transformers applies them: temperature, top-k, top-p, min-p,
    each keeping at least `min_keep` tokens (1 + the number of EOS ids: a beam must be able to go on)."""
    lp = apply_temperature(log_probs, params.temperature)
    out = top_k_filter(lp, max(params.top_k, min_keep) if params.top_k else None)
    for f, arg in ((top_p_filter, params.top_p), (min_p_filter, params.min_p)):
        if arg:
            cut = f(out, arg)
            keep = torch.topk(out, min(min_keep, out.shape[-1]), dim=-1).indices
            out = cut.scatter(-1, keep, out.gather(-1, keep))
    return out


def beam_search(step: Callable[[torch.Tensor], torch.Tensor], reorder: Callable[[torch.Tensor], None],
                prompts: Sequence[Sequence[int]], beam: BeamParams, max_new_tokens: int,
                eos_token_ids: Sequence[int], params: SamplingParams | None = None,
                device=None, rules: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                ) -> list[list[Hypothesis]]:
    """Beam search for a batch of B inputs searched together; per input, `beam.num_return_sequences` hypotheses,
    best first.

    prompts: B decoder starting sequences of one length (a decoder's left-padded prompts, or B x T5's
    [decoder_start_token_id]); the model's rows are input-major: row b * K + k is beam k of input b.
    params: its penalties (repetition, frequency, presence) always apply; with `beam.do_sample` its temperature,
    top_k, top_p, min_p shape the distribution the candidates are drawn from, and its seed seeds each input's
    generator alike (an input samples the same beams alone or in a batch).
    rules: `rules(log_probs (B*K, V), length) -> log_probs`, the model's token rules by sequence length (BART's
    forced tokens and min_length, `lmforge.seq2seq_lm.DecodingRules`), applied after the penalties, as
    transformers applies its logits processors.
    """
    B, K = len(prompts), beam.num_beams
    if B == 0:
        return []
    P = len(prompts[0])
    if P == 0 or any(len(p) != P for p in prompts):
        raise GenerationError("beam search needs starting tokens of one length for every input (pad them)")
    if max_new_tokens <= 0:
        return [[Hypothesis([], 0.0)] * beam.num_return_sequences for _ in range(B)]
    max_length = P + max_new_tokens
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    beams_to_keep = max(2, 1 + len(eos)) * K
    top_mask = torch.zeros(beams_to_keep, dtype=torch.bool, device=device)
    top_mask[:K] = True  # only the K best candidates of a step may finish (the rest are spares to keep K running)
    penalties = None
    if params is not None and (params.repetition_penalty not in (None, 1.0) or params.frequency_penalty
                               or params.presence_penalty):
        penalties = dataclasses.replace(params, temperature=0.0)  # process_logits: penalties only
    generators = None
    if beam.do_sample:
        if params is None or params.greedy:
            raise GenerationError("do_sample with num_beams > 1 samples the beams: it needs a temperature > 0")
        generators = make_generators(params.seed, B, device or "cpu")

    fill = eos[0].item() if len(eos) else 0
    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :P] = torch.as_tensor([list(p) for p in prompts], device=device)[:, None, :]
    running_scores = torch.full((B, K), NEG, device=device)
    running_scores[:, 0] = 0.0  # all beams start identical: only the first may expand, or we would pick K copies
    running_lens = torch.zeros(B, K, dtype=torch.long, device=device)  # generated tokens of each running beam
    finished = running.clone()
    finished_scores = torch.full((B, K), NEG, device=device)
    finished_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    finished_lens = torch.zeros(B, K, dtype=torch.long, device=device)
    can_improve = torch.ones(B, dtype=torch.bool, device=device)  # per input: may a running beam still win?
    offsets = torch.arange(B, device=device)[:, None] * K  # (B, 1) first row of each input

    cur = P
    logits = step(running[:, :, :P].reshape(B * K, P))  # prefill: (B*K, V)
    while True:
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        V = log_probs.shape[-1]
        if penalties is not None or beam.no_repeat_ngram_size:
            seqs = running[:, :, :cur].reshape(B * K, cur).tolist()
        if penalties is not None:
            seen = token_counts(seqs, V, device) > 0
            counts = token_counts([q[P:] for q in seqs], V, device)
            log_probs = process_logits(log_probs, penalties, seen, counts)
        if beam.no_repeat_ngram_size:
            for r, seq in enumerate(seqs):
                banned = banned_ngram_tokens(seq, beam.no_repeat_ngram_size)
                if banned:
                    log_probs[r, list(banned)] = float("-inf")
        if rules is not None:
            log_probs = rules(log_probs, cur)
        if generators is not None:
            log_probs = warp_log_probs(log_probs, params, 1 + len(eos))
        scores = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)  # every beam x token
        if generators is None:
            top_scores, top_idx = torch.topk(scores, beams_to_keep, dim=1)  # (B, 2K)
        else:  # draw 2K distinct candidates in proportion to exp(score), then order them best first
            top_idx = torch.stack([torch.multinomial(F.softmax(scores[b], dim=-1), beams_to_keep,
                                                     generator=generators[b]) for b in range(B)])
            top_scores, order = scores.gather(1, top_idx).sort(dim=1, descending=True)
            top_idx = top_idx.gather(1, order)
        parent, token = top_idx // V, top_idx % V  # (B, 2K)
        cand = _gather(running, parent).clone()  # (B, 2K, max_length)
        cand[:, :, cur] = token
        cand_lens = _gather(running_lens, parent) + 1
        # a candidate stops on EOS or at the length limit
        hits = torch.isin(token, eos) if len(eos) else torch.zeros_like(token, dtype=torch.bool)
        if cur + 1 >= max_length:
            hits = torch.ones_like(hits)
        # the best K candidates that do not stop keep running
        run_scores = top_scores + hits.float() * NEG
        keep = torch.topk(run_scores, K, dim=1).indices  # (B, K)
        running, running_scores, running_lens = _gather(cand, keep), _gather(run_scores, keep), _gather(cand_lens, keep)
        beam_parent = _gather(parent, keep)
        # stopping candidates among the top K enter the finished set, scored with the length penalty
        just_done = hits & top_mask
        final = top_scores / ((cur + 1 - P) ** beam.length_penalty)
        if beam.early_stopping is True:
            final = final + finished_done.all(dim=1, keepdim=True).float() * NEG
        final = final + (~can_improve[:, None]).float() * NEG + (~just_done).float() * NEG
        merged = torch.cat([finished_scores, final], dim=1)
        best = torch.topk(merged, K, dim=1).indices
        finished = _gather(torch.cat([finished, cand], dim=1), best)
        finished_scores = _gather(merged, best)
        finished_done = _gather(torch.cat([finished_done, just_done], dim=1), best)
        finished_lens = _gather(torch.cat([finished_lens, cand_lens], dim=1), best)
        cur += 1
        # can a running beam still beat the worst finished hypothesis? (an unfilled slot counts as -1e9)
        if beam.early_stopping == "never" and beam.length_penalty > 0.0:
            best_len = max_length - P
        else:
            best_len = cur - P
        best_possible = running_scores[:, :1] / (best_len ** beam.length_penalty)  # (B, 1)
        worst = torch.where(finished_done, finished_scores.min(dim=1, keepdim=True).values,
                            torch.full_like(finished_scores, NEG))
        can_improve = can_improve & (best_possible > worst).any(dim=1)
        all_full = bool(finished_done.all()) and beam.early_stopping is True
        if not bool(can_improve.any()) or all_full or bool(hits.all()):
            break
        reorder((beam_parent + offsets).reshape(-1))
        logits = step(running[:, :, cur - 1:cur].reshape(B * K, 1))  # (B*K, 1) -> (B*K, V)
    out = []
    for b in range(B):
        hyps = []
        for k in range(beam.num_return_sequences):
            n = int(finished_lens[b, k])
            hyps.append(Hypothesis(finished[b, k, P:P + n].tolist(), float(finished_scores[b, k])))
        out.append(hyps)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Step functions for lmforge's models
# ----------------------------------------------------------------------------------------------------------------
def reorder_kv_cache(cache, index: torch.Tensor) -> None:
    """A decoder `KVCache`'s rows become rows[index] (in place: the cache object is shared with the step)."""
    cache.k.copy_(cache.k.index_select(1, index))
    cache.v.copy_(cache.v.index_select(1, index))
    cache.lengths.copy_(cache.lengths[index])
    cache.key_mask.copy_(cache.key_mask[index])
    cache.positions.copy_(cache.positions[index])


def decoder_beam_search_batch(model: torch.nn.Module, prompts: Sequence[Sequence[int]], beam: BeamParams,
                              max_new_tokens: int, eos_token_ids: Sequence[int], params: SamplingParams | None = None,
                              max_len: int | None = None, pad_id: int = 0) -> list[list[Hypothesis]]:
    """Beam search with lmforge's decoder-only `Transformer` for B prompts at once (B x num_beams cache rows).
    Prompts are left-padded to one length, as transformers pads a batch; the padding is masked out of attention
    and takes no position. max_len: the context window (the padded prompt + new tokens must fit)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("empty prompt: there is no token to condition on")
    K, P = beam.num_beams, max(len(p) for p in prompts)
    if max_len is not None:
        max_new_tokens = min(max_new_tokens, max_len - P)
    device = next(model.parameters()).device
    padded = [[pad_id] * (P - len(p)) + list(p) for p in prompts]
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    rows_mask = mask.repeat_interleave(K, dim=0) if not bool(mask.all()) else None  # (B*K, P)
    cache = model.new_cache(len(prompts) * K, P + max(max_new_tokens, 1))
    first = [True]

    def step(ids: torch.Tensor) -> torch.Tensor:
        if first[0]:  # prefill: the padded prompts, with their mask
            first[0] = False
            return model(ids, attention_mask=rows_mask, kv_cache=cache, logits_to_keep=1)[:, -1]
        return model(ids, kv_cache=cache, logits_to_keep=1)[:, -1]

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return beam_search(step, lambda idx: reorder_kv_cache(cache, idx), padded, beam, max_new_tokens,
                               eos_token_ids, params, device)
    finally:
        model.train(was_training)


def decoder_beam_search(model: torch.nn.Module, prompt: Sequence[int], beam: BeamParams, max_new_tokens: int,
                        eos_token_ids: Sequence[int], params: SamplingParams | None = None,
                        max_len: int | None = None) -> list[Hypothesis]:
    """Beam search with lmforge's decoder-only `Transformer` for one prompt."""
    return decoder_beam_search_batch(model, [prompt], beam, max_new_tokens, eos_token_ids, params, max_len)[0]


def seq2seq_beam_search_batch(model: torch.nn.Module, inputs: Sequence[Sequence[int]], beam: BeamParams,
                              max_new_tokens: int, eos_token_ids: Sequence[int],
                              params: SamplingParams | None = None,
                              rules: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                              ) -> list[list[Hypothesis]]:
    """Beam search with an encoder-decoder (`lmforge.models.t5.T5`) for B inputs at once: one encoder pass over
    the right-padded inputs (padding masked), then B x num_beams decoder rows."""
    if not inputs or any(len(i) == 0 for i in inputs):
        raise GenerationError("empty input: there is nothing to encode")
    device = next(model.parameters()).device
    K, S = beam.num_beams, max(len(i) for i in inputs)
    cfg = model.config
    ids = torch.full((len(inputs), S), cfg.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(inputs), S, dtype=torch.bool, device=device)
    for r, i in enumerate(inputs):
        ids[r, :len(i)] = torch.as_tensor(list(i), device=device)
        mask[r, :len(i)] = True
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            memory = model.encode(ids, mask).repeat_interleave(K, dim=0)  # (B*K, S, C): one encoder pass
            cache = model.new_cache(memory, mask.repeat_interleave(K, dim=0), 1 + max(max_new_tokens, 1))
            return beam_search(lambda t: model.decode(t, cache=cache)[:, -1], cache.reorder,
                               [[cfg.decoder_start_token_id]] * len(inputs), beam, max_new_tokens, eos_token_ids,
                               params, device, rules)
    finally:
        model.train(was_training)


def seq2seq_beam_search(model: torch.nn.Module, input_ids: Sequence[int], beam: BeamParams, max_new_tokens: int,
                        eos_token_ids: Sequence[int], params: SamplingParams | None = None) -> list[Hypothesis]:
    """Beam search with an encoder-decoder (`lmforge.models.t5.T5`) for one input."""
    return seq2seq_beam_search_batch(model, [input_ids], beam, max_new_tokens, eos_token_ids, params)[0]


# ----------------------------------------------------------------------------------------------------------------
# Text in, text out
# ----------------------------------------------------------------------------------------------------------------
def hypothesis_completion(tokenizer, token_ids: Sequence[int], params: SamplingParams, prompt_tokens: int
                          ) -> Completion:
    """A hypothesis as a `Completion`: cut before the first stop token (EOS) and before the first stop string."""
    stop_ids = set() if params.ignore_eos else set(params.stop_token_ids)
    cut = next((k for k, t in enumerate(token_ids) if t in stop_ids), None)
    ids = list(token_ids if cut is None else token_ids[:cut])
    reason, stop_reason = ("length", None) if cut is None else ("stop", token_ids[cut])
    text = tokenizer.decode(ids) if tokenizer is not None else ""
    hits = [(text.find(s), s) for s in params.stop if s in text]
    if hits:
        at, s = min(hits)
        text, reason, stop_reason = text[:at], "stop", s
    return Completion(text, ids, finish_reason=reason, stop_reason=stop_reason, prompt_tokens=prompt_tokens)
