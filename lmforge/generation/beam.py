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

The model plugs in through a *step function*: `step(ids (K, T)) -> logits (K, V)` feeds the K = num_beams rows'
new tokens (the whole prompt at the first call) into the model's cache and returns the next-token logits, and
`reorder(index (K,))` makes row k of the cache a copy of row index[k] (beam k continues beam index[k]'s text).
`decoder_beam_search` and `seq2seq_beam_search` build these for lmforge's decoder (`Transformer` + `KVCache`) and
T5 (`Seq2SeqCache`, whose cross-attention keys/values are computed once and only copied on reorder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import GenerationError
from lmforge.generation.loop import Completion
from lmforge.generation.sampling import SamplingParams, process_logits, token_counts

NEG = -1.0e9  # HF's "impossible" score (finite, so sums and comparisons stay ordered)


@dataclass
class BeamParams:
    """num_beams: beams kept per input (>= 1); length_penalty: exponent of the length in the final score;
    early_stopping: True | False | "never" (see the module docstring); no_repeat_ngram_size: forbid repeating any
    n-gram of this size (0: off); num_return_sequences: best hypotheses returned per input (<= num_beams)."""

    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1

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


def beam_search(step: Callable[[torch.Tensor], torch.Tensor], reorder: Callable[[torch.Tensor], None],
                prompt: Sequence[int], beam: BeamParams, max_new_tokens: int, eos_token_ids: Sequence[int],
                params: SamplingParams | None = None, device=None) -> list[Hypothesis]:
    """Beam search for one input; returns `beam.num_return_sequences` hypotheses, best first.

    prompt: the decoder's starting ids (a decoder's prompt, or T5's [decoder_start_token_id]);
    params: only its penalties are used (repetition, frequency, presence); temperature and filters are sampling
    controls and do not apply to beam search.
    """
    K, P = beam.num_beams, len(prompt)
    if P == 0:
        raise GenerationError("beam search needs at least one starting token")
    max_length = P + max_new_tokens
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    beams_to_keep = max(2, 1 + len(eos)) * K
    top_mask = torch.zeros(beams_to_keep, dtype=torch.bool, device=device)
    top_mask[:K] = True
    penalties = None
    if params is not None and (params.repetition_penalty not in (None, 1.0) or params.frequency_penalty
                               or params.presence_penalty):
        penalties = dataclasses.replace(params, temperature=0.0)  # process_logits: penalties only

    running = torch.full((K, max_length), eos[0].item() if len(eos) else 0, dtype=torch.long, device=device)
    running[:, :P] = torch.as_tensor(list(prompt), device=device)
    running_scores = torch.full((K,), NEG, device=device)
    running_scores[0] = 0.0  # all beams start identical: only the first may expand, or we would pick K copies
    running_lens = torch.zeros(K, dtype=torch.long, device=device)  # generated tokens of each running beam
    finished = running.clone()
    finished_scores = torch.full((K,), NEG, device=device)
    finished_done = torch.zeros(K, dtype=torch.bool, device=device)
    finished_lens = torch.zeros(K, dtype=torch.long, device=device)
    can_improve = True

    if max_new_tokens <= 0:
        return [Hypothesis([], 0.0)][:beam.num_return_sequences]
    cur = P
    logits = step(running[:, :P])  # prefill: (K, V)
    while True:
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (K, V)
        V = log_probs.shape[-1]
        if penalties is not None:
            seqs = running[:, :cur].tolist()
            seen = token_counts(seqs, V, device) > 0
            counts = token_counts([s[P:] for s in seqs], V, device)
            log_probs = process_logits(log_probs, penalties, seen, counts)
        if beam.no_repeat_ngram_size:
            for k, seq in enumerate(running[:, :cur].tolist()):
                banned = banned_ngram_tokens(seq, beam.no_repeat_ngram_size)
                if banned:
                    log_probs[k, list(banned)] = float("-inf")
        scores = (log_probs + running_scores[:, None]).reshape(-1)  # (K*V,) every beam x every token
        top_scores, top_idx = torch.topk(scores, beams_to_keep)  # (2K,)
        parent = top_idx // V
        token = top_idx % V
        cand = running[parent].clone()  # (2K, max_length)
        cand[:, cur] = token
        cand_lens = running_lens[parent] + 1
        # a candidate stops on EOS or at the length limit
        hits = torch.isin(token, eos) if len(eos) else torch.zeros_like(token, dtype=torch.bool)
        if cur + 1 >= max_length:
            hits = torch.ones_like(hits)
        # the best K candidates that do not stop keep running
        run_scores = top_scores + hits.float() * NEG
        keep = torch.topk(run_scores, K).indices
        running, running_scores, running_lens = cand[keep], run_scores[keep], cand_lens[keep]
        beam_parent = parent[keep]
        # stopping candidates among the top K enter the finished set, scored with the length penalty
        just_done = hits & top_mask
        final = top_scores / ((cur + 1 - P) ** beam.length_penalty)
        if beam.early_stopping is True and bool(finished_done.all()):
            final = final + NEG
        if not can_improve:
            final = final + NEG
        final = final + (~just_done).float() * NEG
        merged = torch.cat([finished_scores, final])
        best = torch.topk(merged, K).indices
        finished = torch.cat([finished, cand])[best]
        finished_scores = merged[best]
        finished_done = torch.cat([finished_done, just_done])[best]
        finished_lens = torch.cat([finished_lens, cand_lens])[best]
        cur += 1
        # can a running beam still beat the worst finished hypothesis?
        if beam.early_stopping == "never" and beam.length_penalty > 0.0:
            best_len = max_length - P
        else:
            best_len = cur - P
        best_possible = running_scores[0] / (best_len ** beam.length_penalty)
        worst = finished_scores.min() if bool(finished_done.all()) else torch.tensor(-1.0e9)
        can_improve = can_improve and bool(best_possible > worst)
        all_full = bool(finished_done.all()) and beam.early_stopping is True
        if not can_improve or all_full or bool(hits.all()):
            break
        reorder(beam_parent)
        logits = step(running[:, cur - 1:cur])  # (K, 1) -> (K, V)
    out = []
    for k in range(beam.num_return_sequences):
        n = int(finished_lens[k])
        out.append(Hypothesis(finished[k, P:P + n].tolist(), float(finished_scores[k])))
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


def decoder_beam_search(model: torch.nn.Module, prompt: Sequence[int], beam: BeamParams, max_new_tokens: int,
                        eos_token_ids: Sequence[int], params: SamplingParams | None = None,
                        max_len: int | None = None) -> list[Hypothesis]:
    """Beam search with lmforge's decoder-only `Transformer` (one prompt; K = num_beams cache rows)."""
    if not prompt:
        raise GenerationError("empty prompt: there is no token to condition on")
    if max_len is not None:
        max_new_tokens = min(max_new_tokens, max_len - len(prompt))
    device = next(model.parameters()).device
    cache = model.new_cache(beam.num_beams, len(prompt) + max(max_new_tokens, 1))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return beam_search(lambda ids: model(ids, kv_cache=cache, logits_to_keep=1)[:, -1],
                               lambda idx: reorder_kv_cache(cache, idx), prompt, beam, max_new_tokens,
                               eos_token_ids, params, device)
    finally:
        model.train(was_training)


def seq2seq_beam_search(model: torch.nn.Module, input_ids: Sequence[int], beam: BeamParams, max_new_tokens: int,
                        eos_token_ids: Sequence[int], params: SamplingParams | None = None) -> list[Hypothesis]:
    """Beam search with an encoder-decoder (`lmforge.models.t5.T5`): encode once, decode num_beams rows."""
    if not input_ids:
        raise GenerationError("empty input: there is nothing to encode")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids = torch.as_tensor([list(input_ids)], device=device)  # (1, S)
            memory = model.encode(ids).expand(beam.num_beams, -1, -1)  # (K, S, C): one encoder pass
            cache = model.new_cache(memory, None, 1 + max(max_new_tokens, 1))
            return beam_search(lambda t: model.decode(t, cache=cache)[:, -1], cache.reorder,
                               [model.config.decoder_start_token_id], beam, max_new_tokens, eos_token_ids,
                               params, device)
    finally:
        model.train(was_training)


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
