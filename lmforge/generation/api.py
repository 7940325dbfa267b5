"""Text generation over an `LM` (model + tokenizer + defaults): strings in, strings out.

The pieces: `lmforge.generation.sampling` (logits -> one token), `lmforge.generation.loop` (the token-id loop with
a KV cache), `lmforge.generation.stops` (ids -> text deltas and stop strings), `lmforge.generation.decode` (fast
one-token steps). This module ties them to a tokenizer and a chat template.

Settings are typed at the door. Keyword controls (`temperature=0.8`, or a CLI's flags) become one validated
`SamplingParams` in `resolve_params`, over the model's generation_config.json defaults, before anything else runs;
a caller that already holds one passes it as `params=` (the CLI and the server do). The run options (truncate,
use_cache, compile, static) are keyword arguments of their own, not controls.

Public API (what `lmforge.lm.LM` delegates to):
    generate(lm, "Once upon", max_new_tokens=50, temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=0) -> str
    generate(lm, ["a", "b"], ...) -> list[str]             (one left-padded batch)
    stream(lm, prompt, ...) -> iterator of text deltas
    chat(lm, [{"role": "user", "content": "Hi"}], ...) -> str
    score(lm, prompt, continuation) -> Score(logprob=sum, token_logprobs=[...])
    generate(lm, "A user as JSON:", json_schema={"type": "object", ...}) -> a str that parses and follows it
Lower level, for the serving engine: `SamplingParams`, `sample_next_token`, `StopChecker`, `generate_ids`,
`token_logprobs`. Speed: `generate(..., compile=True)` decodes through a static-shape step compiled with
torch.compile (`lmforge.generation.decode.Decoder`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Iterator, Sequence

from lmforge.errors import GenerationError
from lmforge.generation import beam
from lmforge.generation.constrain import request_constraints
from lmforge.generation.loop import Score, _eval_mode, _new_checker, decode_steps, generate_ids, token_logprobs
from lmforge.generation.sampling import SamplingParams
from lmforge.tokenizers.chat_template import apply_chat_template, end_of_turn_markers


_RUN_OPTIONS = ("truncate", "use_cache", "compile", "static")  # keyword arguments of generate/stream/chat


def resolve_params(lm, controls: dict[str, Any] | None = None, params: SamplingParams | None = None) -> SamplingParams:
    """The one typed, validated set of controls for a request: `params` (default: `lm.generation_config`'s
    values), overridden by keyword `controls`; the model's EOS ids added to stop_token_ids. An unknown control is a
    one-line error with the closest name."""
    controls = controls or {}
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    bad = [k for k in controls if k not in names]
    if bad:
        close = difflib.get_close_matches(bad[0], sorted(names) + list(_RUN_OPTIONS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = " (a run option: pass it to generate/stream/chat itself)" if bad[0] in _RUN_OPTIONS else ""
        raise GenerationError(f"unknown generation control {bad[0]!r}{where or hint}")
    base_of = params if params is not None else getattr(lm, "generation_config", None)
    base: dict[str, Any] = {}
    if base_of is not None:
        for name in names:
            if hasattr(base_of, name) and getattr(base_of, name) is not None:
                base[name] = getattr(base_of, name)
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


def _prepare(lm, prompts: Sequence[str | Sequence[int]], controls: dict[str, Any] | None = None,
             add_bos: bool | None = None, *, params: SamplingParams | None = None, truncate: bool = False):
    """(SamplingParams, prompt ids, pad id, context window) for a request."""
    if getattr(lm, "is_encoder", False):
        raise GenerationError(f"{getattr(lm, 'path', None) or 'this model'} is an encoder (BERT-style): it fills "
                              "masks and embeds text but does not generate; use a decoder model")
    params = resolve_params(lm, controls, params)
    block_size = lm.model.config.block_size
    ids = [_fit_context(encode_prompt(lm, p, add_bos=add_bos), block_size, truncate) for p in prompts]
    tok = lm.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None)
    return params, ids, (pad if pad is not None else 0), block_size


def _is_batch(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)


def generate(lm, prompt: str | Sequence[int] | Sequence[str], params: SamplingParams | None = None, *,
             truncate: bool = False, use_cache: bool = True, compile: bool | str = False, static: bool | None = None,
             **controls: Any) -> str | list[str]:
    """Complete one prompt (-> str) or a list of prompts (-> list[str], generated as one left-padded batch).

    Controls: a `SamplingParams` (`params`), and/or its fields as keywords (max_new_tokens, temperature, top_k,
    top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty, stop, stop_token_ids, seed, logprobs,
    top_logprobs, ignore_eos, json, json_schema), which override it; defaults come from `lm.generation_config`.
    json=True constrains the output to one JSON object, json_schema=schema to JSON following the schema
    (`lmforge.generation.constrain`; the text ends, finish_reason "stop", when the document is complete). Beam controls
    (num_beams, ...) run a beam search (`generate_beams`). Run options: truncate=True (keep the end of a too-long
    prompt), use_cache=False (reference path), compile=True (decode steps through torch.compile: a one-time
    compile, then faster steps; see `decode.Decoder`), static=True (the same static-shape step, not compiled).
    The returned strings are `Completion`s: `.token_ids`, `.logprobs`, `.finish_reason`.
    """
    if controls.keys() & {"num_beams", "num_return_sequences", "length_penalty", "early_stopping",
                          "no_repeat_ngram_size", "do_sample"}:
        return generate_beams(lm, prompt, params, truncate=truncate, **controls)  # num_beams=1 comes back here
    batch = _is_batch(prompt)
    prompts = list(prompt) if batch else [prompt]
    if batch and not all(isinstance(p, str) or (isinstance(p, (list, tuple))) for p in prompts):
        raise GenerationError("prompts must be strings or lists of token ids")
    params, ids, pad, block_size = _prepare(lm, prompts, controls, params=params, truncate=truncate)
    constraints = request_constraints(lm.tokenizer, lm.model.config.vocab_size, params, len(ids))
    outs = generate_ids(lm.model, ids, params, lm.tokenizer, use_cache=use_cache, pad_id=pad, max_len=block_size,
                        compile=compile, static=static, constraints=constraints)
    return outs if batch else outs[0]


def stream(lm, prompt: str | Sequence[int], params: SamplingParams | None = None, *, truncate: bool = False,
           use_cache: bool = True, compile: bool | str = False, static: bool | None = None,
           **controls: Any) -> Iterator[str]:
    """Yield the completion as text deltas, as soon as they are safe to show (whole characters, no stop text).
    `"".join(stream(lm, p, **c)) == generate(lm, p, **c)`; the arguments are `generate`'s."""
    if _is_batch(prompt):
        raise GenerationError("stream() takes one prompt; use generate() for a list")
    params, ids, pad, block_size = _prepare(lm, [prompt], controls, params=params, truncate=truncate)
    return _stream_ids(lm, ids, params, pad, block_size, use_cache, compile, static)


def _stream_ids(lm, ids, params, pad, block_size, use_cache, compile=False, static=None) -> Iterator[str]:
    checker = _new_checker(lm.tokenizer, params, ids[0])
    constraints = request_constraints(lm.tokenizer, lm.model.config.vocab_size, params, 1)
    with _eval_mode(lm.model):
        for events in decode_steps(lm.model, ids, params, [checker], use_cache=use_cache, pad_id=pad,
                                   max_len=block_size, compile=compile, static=static, constraints=constraints):
            for _, delta in events:
                if delta:
                    yield delta


def chat_prompt(lm, messages: Sequence[dict], *, add_generation_prompt: bool = True, tools=None, **kwargs) -> str:
    """Render messages with the model's chat template (ChatML when it has none)."""
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


def end_of_turn_stops(lm, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = ()) -> tuple[list[str], list[int]]:
    """`stop` and `stop_token_ids` plus the chat template's end-of-turn markers: a marker that is a special token
    stops as its id, any other as a string."""
    specials = getattr(lm.tokenizer, "special_tokens", None) or {}
    stop, stop_ids = list(stop), list(stop_token_ids)
    for marker in end_of_turn_markers(lm.chat_template):
        if marker in specials:
            if specials[marker] not in stop_ids:
                stop_ids.append(specials[marker])
        elif marker not in stop:
            stop.append(marker)
    return stop, stop_ids


def chat_params(lm, params: SamplingParams | None = None, **controls: Any) -> SamplingParams:
    """The request's `SamplingParams` (see `resolve_params`), stopping at the end of the assistant's turn."""
    params = resolve_params(lm, controls, params)
    stop, stop_ids = end_of_turn_stops(lm, params.stop, params.stop_token_ids)
    return dataclasses.replace(params, stop=stop, stop_token_ids=stop_ids)


def encode_chat(lm, text: str) -> list[int]:
    """Chat prompts are tokenized with special tokens recognised and without adding BOS (the template did)."""
    if lm.tokenizer is None:
        raise GenerationError("this model has no tokenizer, so it cannot chat")
    return encode_text(lm.tokenizer, text)


def chat(lm, messages: Sequence[dict], tools: list[dict] | None = None, params: SamplingParams | None = None, *,
         truncate: bool = False, use_cache: bool = True, compile: bool | str = False, **controls: Any) -> str:
    """Answer the conversation: the assistant's next message as text (stops at the end-of-turn marker).
    Controls and run options as in `generate`."""
    text = chat_prompt(lm, messages, tools=tools)
    return generate(lm, encode_chat(lm, text), chat_params(lm, params, **controls), truncate=truncate,
                    use_cache=use_cache, compile=compile)


def chat_stream(lm, messages: Sequence[dict], tools: list[dict] | None = None, params: SamplingParams | None = None,
                *, truncate: bool = False, use_cache: bool = True, compile: bool | str = False,
                **controls: Any) -> Iterator[str]:
    """`chat` as text deltas (for terminals and servers)."""
    text = chat_prompt(lm, messages, tools=tools)
    return stream(lm, encode_chat(lm, text), chat_params(lm, params, **controls), truncate=truncate,
                  use_cache=use_cache, compile=compile)



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


def generate_beams(lm, prompt, params: SamplingParams | None = None, *, truncate: bool = False, **controls):
    """`lm.generate(prompt, num_beams=4, ...)` for a decoder-only `LM`: one str per prompt (a list of
    num_return_sequences strs when that is > 1); a list of prompts gives a list, searched together (left-padded
    to one length, B x num_beams cache rows), as transformers does. do_sample=True samples the beams (seeded by
    `seed`). num_beams=1 is the ordinary loop (greedy or sampling), except with no_repeat_ngram_size, which runs
    a one-beam search (greedy + the ban)."""
    controls = dict(controls)
    bp = beam.BeamParams.pop_from(controls)
    if bp.num_beams == 1 and bp.num_return_sequences == 1 and not bp.no_repeat_ngram_size:
        return generate(lm, prompt, params, truncate=truncate, **controls)  # one beam: the ordinary loop
    batch = _is_batch(prompt)
    params, ids, pad, block_size = _prepare(lm, list(prompt) if batch else [prompt], controls, params=params,
                                            truncate=truncate)
    if params.json:
        raise GenerationError("json / json_schema constrain greedy or sampled decoding, not beam search: drop "
                              "num_beams (or set it to 1)")
    hyps = beam.decoder_beam_search_batch(lm.model, ids, bp, params.max_new_tokens, params.stop_token_ids, params,
                                          max_len=block_size, pad_id=pad)
    outs = []
    for p, hs in zip(ids, hyps):
        comps = [beam.hypothesis_completion(lm.tokenizer, h.token_ids, params, len(p)) for h in hs]
        outs.append(comps if bp.num_return_sequences > 1 else comps[0])
    return outs if batch else outs[0]
