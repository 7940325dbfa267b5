"""The continuous-batching engine: many requests share one model, one KV cache and one forward per step.

Why batch at all? Decoding one token for one sequence reads every weight of the model once; on a CPU (and even
more on a GPU) that is bandwidth-bound, so decoding B sequences in one forward costs barely more than one.
*Static* batching (wait for B requests, run them to the end together) wastes that: short requests sit finished
while the longest one runs, and new requests wait for the whole batch. *Continuous* (or "in-flight") batching
(Yu et al. 2022, "Orca"; vLLM, TGI) schedules at the granularity of one decode step instead:

    loop:
        drop the sequences whose client went away
        admit waiting requests into free KV-cache slots (prefill: one forward over all their prompts)
        one decode forward for every active slot at once (each row at its own length and position)
        sample each row with its own controls and RNG; finished rows leave the batch at once
        hand the step's events to the server in one burst

The KV cache (`lmforge.models.decoder.KVCache`) is pre-allocated for `max_batch` rows of `max_len` slots and keeps a
length, a key mask and a next position per row, so rows of different lengths decode together. Active sequences
are kept packed in rows 0..n-1: when one leaves, the last row's keys and values move into its slot, and the
decode forward runs on `cache.rows(0, n)` only (its cost follows the number of live requests, not `max_batch`).

Batched prefill. Requests admitted together are prefilled in one forward (up to `prefill_tokens` padded prompt
tokens each): a forward's fixed cost (dispatching ~100 ops, reading every weight) is paid once, not once per
prompt. Prompts of different lengths are left-padded (the padding is masked out and takes no position), so each
row's last real token sits in the last column and `logits_to_keep=1` gives every row's next-token logits. The
padding is then squeezed out of the cache (each row's keys and values move to slots 0..len-1), so a row's cache
is exactly what prefilling it alone would have left. Prompts that want their logprobs (`echo`) need the logits
of every position and form their own, smaller batches.

The engine speaks token ids (as nanochat's engine does): text, chat templates, stop strings and detokenization
belong to the server (`lmforge.serve.app`). Sampling reuses `lmforge.generation.api`'s small pure functions, each
request with its own `torch.Generator`, so a request's output does not depend on what else is in the batch: a
seeded request gives the same tokens served alone or among 31 others (tests/test_serve_engine.py checks this).

All model work (prefill, decode, embeddings, scoring) runs on one background thread; other threads talk to it
through `submit`, `cancel` and `call`, which only touch queues under a lock. The engine thread keeps its Python
work per step small (one `.tolist()` per step for the sampled tokens, lengths tracked in Python, not read back
from tensors) and delivers the events of a phase (prefill, decode step) together at its end: a server turns that
burst into one wake-up of its event loop instead of one per token (see `app.EventPump`).

The decode step is `lmforge.generation.decode.decode_step` (the one `generate` uses), not the model's general
forward, with the output layer computed as W @ h^T (`_OutputLayer`): on a small model on a CPU most of a step's time
went to that generality and to one slow BLAS call (`_decode_step`). `lmforge serve` runs the loop on the main thread
(`run`), where PyTorch's thread pool lives.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import GenerationError, LmforgeError
from lmforge.generation.decode import decode_step, decoder_for, fused_weights
from lmforge.generation.sampling import SamplingParams, greedy, process_logits, sample

log = logging.getLogger(__name__)


class EngineBusyError(LmforgeError):
    """The waiting queue is full: the server answers 429 and the client retries later."""


class EngineStoppedError(LmforgeError):
    """The engine is not running (shutting down, or its loop died): the server answers 503."""


class TokenConstraint(Protocol):
    """Restricts which token may come next (used for JSON mode and forced tool calls; see `constrain.py`)."""

    def allows(self, token_id: int) -> bool: ...

    def advance(self, token_id: int) -> None: ...

    def is_complete(self) -> bool: ...

    # optional: `candidates() -> list[int]`, a superset of the allowed ids that is cheap to compute


@dataclass
class Event:
    """What the engine reports for a sequence: one sampled token, the prompt's logprobs, or the end."""

    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None  # per prompt token
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One request's state inside the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    constraint: TokenConstraint | None = None
    prompt_logprobs: int | None = None
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, V) bool: tokens in prompt or output (repetition_penalty)
    counts: torch.Tensor | None = None  # (1, V) long: generated-token counts (frequency/presence penalties)
    pending: int | None = None  # sampled, not yet fed through the model
    n_cached: int = 0  # KV-cache slots this sequence's row holds (prompt + fed tokens), tracked without syncs
    cancelled: bool = False
    finished: bool = False
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


class Engine:
    """Continuous batching over one `Transformer`.

        engine = Engine(lm.model, max_batch=16, eos_token_ids=[tok.eos_token_id]).start()
        seq = engine.submit(prompt_ids, SamplingParams(max_new_tokens=20, temperature=0), on_event=print)
        ...
        engine.shutdown()

    `submit` is thread-safe and returns at once; events arrive on the engine thread through `on_event` (keep
    the callback short: hand the event to your own queue or event loop). `params.stop` strings are ignored
    here (text is the server's business); `params.stop_token_ids` and `eos_token_ids` end a sequence.
    """

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 8, max_len: int | None = None,
                 max_queue: int = 256, eos_token_ids: list[int] | tuple[int, ...] = (),
                 prefill_tokens: int = 2048):
        if max_batch < 1:
            raise GenerationError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_tokens < 1:
            raise GenerationError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.model = model.eval()
        self.config = model.config
        self.max_batch = max_batch
        # the cache holds max_batch x max_len slots per layer; learned positions end at block_size
        self.max_len = min(max_len or 2048, self.config.block_size)
        self.max_queue = max_queue
        # padded prompt tokens per prefill forward (a longer prompt still goes through, alone); bounds the memory
        # of the attention scores and, for prompts that want logprobs, of the (rows, T, V) logits (a quarter)
        self.prefill_tokens = prefill_tokens
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids if i is not None)
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_batch, self.max_len)
        # the decode step: `lmforge.generation.decode.decode_step` (fused projections, no per-step mask building)
        # where it applies, else the model's forward (see `_decode_step`)
        self._fast_step = decoder_for(model) is not None
        self._step_model = _WithOutputLayer(model) if self._fast_step else None
        self._decode_weights = None  # the model's DecodeWeights, fetched at each prefill (remade if weights change)
        self._rope = model.rope_table(self.max_len, model.norm_f.weight.dtype) \
            if self._fast_step and model.wpe is None else (None, None)
        self._valid = torch.ones(max_batch, dtype=torch.bool, device=self.device)  # every decoded row is real
        self.active: list[Sequence] = []  # row i of the cache holds active[i]
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None  # the thread running the loop (its own, or `run`'s caller)
        self.running = False
        self._stopped = threading.Event()  # set when the loop has ended (or never started)
        self._stopped.set()
        self.error: str | None = None
        self._outbox: list[tuple[Sequence, Event]] | None = None  # events of the current phase (engine thread)
        self._thread_id: int | None = None
        # counters read by /metrics and the benchmark
        self.steps = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.batch_size_sum = 0  # sum over decode steps of the rows decoded (mean batch = sum / steps)
        self.prefills = 0  # prefill forwards (fewer than requests when several were admitted together)

    # ---- public, thread-safe -------------------------------------------------------------------------------
    def start(self, thread: bool = True) -> "Engine":
        """Start the scheduler loop on a thread of its own; with thread=False only mark the engine running: the
        caller then runs the loop on its own thread with `run` (why: see `run`)."""
        with self.cond:
            if self.running:
                return self
            self.running = True
            self._stopped.clear()
        if thread:
            self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self.thread.start()
        return self

    def run(self) -> None:
        """Run the scheduler loop on the calling thread until `shutdown` (called from another thread) stops it.

        Why a caller would: PyTorch's CPU operations run on an OpenMP thread pool (GNU libgomp in the Linux
        wheels), and that pool belongs to the thread that started it, usually the main thread that loaded the
        model. Model work on another thread gets a second pool, and once a process has more pool threads than
        cores libgomp stops letting idle workers spin between parallel operations: they sleep, and each of the
        ~40 parallel operations of a decode step pays a wake-up. Measured on bench_serve's 30M-parameter model
        (2 threads, 2 cores): the same decode step 4.7 ms on the main thread, 6.6 ms on a second thread.
        `lmforge serve` therefore runs the engine on the main thread and the HTTP server on a second one
        (`lmforge.serve.server.serve`), which does no parallel tensor work."""
        with self.cond:
            if not self.running:
                raise EngineStoppedError(self.error or "call start(thread=False) before run()")
        self.thread = threading.current_thread()
        self._loop()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self._stopped.wait(timeout)  # the loop's end (not the thread's: `run` leaves its caller's thread alive)
        with self.cond:
            pending = list(self.waiting) + list(self.active)
            calls = list(self.calls)
            self.waiting.clear()
            self.active.clear()
            self.calls.clear()
        for seq in pending:
            self._finish(seq, "cancelled")
        for _, fut in calls:
            fut.set_exception(EngineStoppedError("the engine shut down"))

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None],
               constraint: TokenConstraint | None = None, prompt_logprobs: int | None = None) -> Sequence:
        """Queue a request. Raises GenerationError (bad input), EngineBusyError (queue full), EngineStoppedError.

        prompt_logprobs: report log p(prompt[j] | prompt[:j]) for every j >= 1 (and this many alternatives):
        what the OpenAI API's `echo` + `logprobs` return, and how lm-evaluation-harness scores a continuation.
        """
        if not prompt_ids:
            raise GenerationError("the prompt is empty: give at least one token")
        V = self.config.vocab_size
        bad = [i for i in prompt_ids if not (isinstance(i, int) and 0 <= i < V)]
        if bad:
            raise GenerationError(f"token id {bad[0]!r} is outside the vocabulary (size {V})")
        if len(prompt_ids) + params.max_new_tokens > self.max_len:
            raise GenerationError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_new_tokens} exceeds the context "
                f"window of {self.max_len} tokens")
        seq = Sequence(list(prompt_ids), params, on_event, constraint, prompt_logprobs)
        if not params.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 2
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        with self.cond:
            if not self.running:
                raise EngineStoppedError(self.error or "the engine is not running")
            if len(self.waiting) >= self.max_queue:
                raise EngineBusyError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.waiting.append(seq)
            self.cond.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (client gone, or a stop string matched): its slot is freed before the next step."""
        with self.cond:
            seq.cancelled = True
            queued = seq in self.waiting
            if queued:  # never started: leave the queue now (it no longer counts against max_queue)
                self.waiting.remove(seq)
            self.cond.notify_all()
        if queued:
            self._finish(seq, "cancelled")

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between two steps (model access is never concurrent)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if not self.running:
                raise EngineStoppedError(self.error or "the engine is not running")
            self.calls.append((fn, fut))
            self.cond.notify_all()
        return fut

    def queue_depth(self) -> int:
        return len(self.waiting)

    def num_active(self) -> int:
        return len(self.active)

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> list[int]:
        """Blocking convenience (tests, benchmarks): the generated ids of one request."""
        done, out = threading.Event(), []

        def on_event(ev: Event) -> None:
            if ev.token_id is not None:
                out.append(ev.token_id)
            if ev.finish_reason is not None:
                done.set()

        self.submit(prompt_ids, params, on_event)
        if not done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return out

    # ---- the scheduler loop (engine thread) -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run_loop()
        finally:
            self._outbox = None  # events sent from now on (e.g. by a later `shutdown`) are delivered at once
            self._stopped.set()

    def _run_loop(self) -> None:
        self._thread_id = threading.get_ident()
        self._outbox = []
        try:
            with torch.inference_mode():
                while True:
                    with self.cond:
                        while self.running and not (self.waiting or self.active or self.calls):
                            self.cond.wait()
                        if not self.running:
                            return
                        calls = list(self.calls)
                        self.calls.clear()
                        for seq in [s for s in self.waiting if s.cancelled]:
                            self.waiting.remove(seq)
                            self._finish(seq, "cancelled")
                        admit = []
                        while self.waiting and len(self.active) + len(admit) < self.max_batch:
                            admit.append(self.waiting.popleft())
                    for fn, fut in calls:
                        if fut.set_running_or_notify_cancel():
                            try:
                                fut.set_result(fn())
                            except Exception as e:  # the caller gets it from the future and decides
                                fut.set_exception(e)
                    self._drop_cancelled()
                    if admit:
                        self._prefill(admit)
                        self._flush_events()  # first tokens now, not after the decode step
                    if self.active:
                        self._decode_step()
                    self._flush_events()
        except Exception as e:  # a bug: fail every request loudly instead of leaving them hanging
            log.exception("engine loop crashed")
            self._flush_events()
            self._outbox = None
            self.error = f"engine stopped after an internal error: {type(e).__name__}: {e}"
            with self.cond:
                self.running = False
                pending = list(self.waiting) + list(self.active)
                self.waiting.clear()
                self.active.clear()
            for seq in pending:
                self._finish(seq, "error")
            self.shutdown()

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self.active))):
            seq = self.active[row]
            if seq.cancelled:
                self._retire(row, "cancelled")

    def _retire(self, row: int, reason: str) -> None:
        """Free a cache row, keeping active rows packed: the last row moves into the hole."""
        seq = self.active[row]
        last = len(self.active) - 1
        c = self.cache
        if row != last:
            L = self.active[last].n_cached
            c.k[:, row, :, :L] = c.k[:, last, :, :L]
            c.v[:, row, :, :L] = c.v[:, last, :, :L]
            c.key_mask[row] = c.key_mask[last]
            c.lengths[row] = c.lengths[last]
            c.positions[row] = c.positions[last]
            self.active[row] = self.active[last]
        self.active.pop()
        c.reset(last)
        self._finish(seq, reason)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill newly admitted sequences, as few forwards as the token budget allows; sample their first tokens.

        Sorting by length keeps the padding small; prompts that want logprobs for every position go in batches of
        their own (a quarter of the budget: their logits are (rows, T, V))."""
        live = []
        for seq in seqs:
            if seq.cancelled:
                self._finish(seq, "cancelled")
            else:
                live.append(seq)
        if self._fast_step and live:
            self._decode_weights = fused_weights(self.model)  # made once; remade only if the weights changed
        for want_all in (False, True):
            budget = self.prefill_tokens if not want_all else max(1, self.prefill_tokens // 4)
            group = sorted((s for s in live if (s.prompt_logprobs is not None) == want_all),
                           key=lambda s: len(s.prompt_ids))
            batch: list[Sequence] = []
            for seq in group:  # ascending lengths: the newest prompt is the longest, it sets the padded width
                if batch and (len(batch) + 1) * len(seq.prompt_ids) > budget:
                    self._prefill_batch(batch, want_all)
                    batch = []
                batch.append(seq)
            if batch:
                self._prefill_batch(batch, want_all)

    def _prefill_batch(self, batch: list[Sequence], want_all: bool) -> None:
        """One forward over the (left-padded) prompts of `batch`, in the free rows after the active ones."""
        batch = sorted(batch, key=lambda s: s.params.max_new_tokens == 0)  # score-only ones last: no row kept
        n0, k = len(self.active), len(batch)
        lens = [len(s.prompt_ids) for s in batch]
        T = max(lens)
        for r in range(n0, n0 + k):
            self.cache.reset(r)
        rows = self.cache.rows(n0, n0 + k)
        # left padding: row j's real tokens fill the last lens[j] columns (the pad id is masked out; any id will do)
        ids = torch.tensor([[s.prompt_ids[0]] * (T - L) + s.prompt_ids for s, L in zip(batch, lens)],
                           dtype=torch.long, device=self.device)  # (k, T)
        padded = min(lens) < T
        mask = torch.tensor([[0] * (T - L) + [1] * L for L in lens], dtype=torch.long, device=self.device) \
            if padded else None  # (k, T)
        logits = self.model(ids, attention_mask=mask, kv_cache=rows,
                            logits_to_keep=0 if want_all else 1)  # (k, T or 1, V)
        if padded:
            self._squeeze_padding(rows, lens, T)
        self.prefills += 1
        self.prompt_tokens += sum(lens)
        V = self.config.vocab_size
        emit: list[int] = []  # rows that sample a first token
        for j, (seq, L) in enumerate(zip(batch, lens)):
            p = seq.params
            seq.n_cached = L
            if want_all:
                self._send(seq, Event(prompt_logprobs=self._prompt_logprobs(seq, logits[j, T - L:])))
            if p.max_new_tokens == 0:  # only the prompt was scored: done, its row is not kept
                self._finish(seq, "length")
                continue
            if p.repetition_penalty not in (None, 1.0):
                seq.seen = torch.zeros(1, V, dtype=torch.bool, device=self.device)
                seq.seen[0, torch.tensor(seq.prompt_ids, device=self.device)] = True
            if p.frequency_penalty or p.presence_penalty:
                seq.counts = torch.zeros(1, V, dtype=torch.long, device=self.device)
            self.active.append(seq)
            emit.append(j)
        if emit:
            self._emit_rows([n0 + j for j in emit], logits[emit, -1])

    @staticmethod
    def _squeeze_padding(rows, lens: list[int], T: int) -> None:
        """Move each left-padded row's keys and values from slots T-L..T-1 to 0..L-1: the row then looks exactly
        as if its prompt had been prefilled alone (no wasted slots; lengths and key mask per row as usual)."""
        for j, L in enumerate(lens):
            pad = T - L
            if not pad:
                continue
            rows.k[:, j, :, :L] = rows.k[:, j, :, pad:T].clone()  # (n_layer, nkv, L, hd); clone: ranges overlap
            rows.v[:, j, :, :L] = rows.v[:, j, :, pad:T].clone()
            rows.key_mask[j, :L] = True
            rows.key_mask[j, L:T] = False
            rows.lengths[j] = L  # positions already count real tokens only

    def _decode_step(self) -> None:
        """One new token for every active row.

        Through `decode_step` (lmforge.generation.decode), not the model's forward: the forward is written for
        any input (T tokens, padding, rows at different lengths), and for one token per row it pays for that
        generality each step (a (B, 1, 1, S) mask built from the cache's key mask, `int(lengths.max())` and
        `bool(mask.all())` read back from tensors, seven separate projections per layer). The engine knows more:
        each row's cached length is a Python int (`n_cached`), and rows are packed from slot 0 with no padding
        (`_squeeze_padding`). So:

        * every row at the same length (one request; requests admitted together with prompts of one length):
          the `dense` step, which writes slot L of every row, attends to slots [0, L] with no mask at all and
          runs each layer's attention as one kernel call;
        * rows at different lengths: the per-row step (each row writes at its own `lengths`), given views of
          the cache cut to S = the longest row + 1 slots, so attention reads S slots, not `max_len`.

        Either way the step updates the cache's key mask, lengths and positions exactly as the forward does.
        Measured on bench_serve's 30M-parameter model (2 threads, 1 row, main thread): 12.7 ms per step through
        the forward, 4.6 ms here; 5.6 ms of the difference is the output layer (see `_OutputLayer`), the rest
        the fused projections and the one-call attention."""
        n = len(self.active)
        ids = torch.tensor([[s.pending] for s in self.active], dtype=torch.long, device=self.device)  # (n, 1)
        if self._fast_step:
            c = self.cache
            lens = [s.n_cached for s in self.active]
            S = max(lens) + 1  # slots any row can attend to after this step's write
            dense = min(lens) == S - 1
            cut = slice(None) if dense else slice(0, S)  # the dense step slices [0, S) itself
            logits = decode_step(self._step_model, self._decode_weights, ids, self._valid[:n],
                                 c.k[:, :n, :, cut], c.v[:, :n, :, cut], c.key_mask[:n, cut], c.lengths[:n],
                                 c.positions[:n], *self._rope, span=S if dense else None, dense=dense)  # (n, V)
        else:  # a model the step does not know (a wrapper, a mixture of experts): its own forward
            logits = self.model(ids, kv_cache=self.cache.rows(0, n))[:, -1]  # (n, V), each row at its own position
        for seq in self.active:
            seq.n_cached += 1
        self.steps += 1
        self.batch_size_sum += n
        self._emit_rows(list(range(n)), logits)

    def _emit_rows(self, rows: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of each active[row] from logits (len(rows), V); report it; retire finished rows."""
        seqs = [self.active[r] for r in rows]
        tokens = self._sample(seqs, logits)
        need_lp = [i for i, s in enumerate(seqs) if s.params.logprobs]
        logprobs = F.log_softmax(logits[need_lp].float(), dim=-1) if need_lp else None  # the model's own
        lp_row = {i: j for j, i in enumerate(need_lp)}
        done: list[tuple[int, str]] = []
        now = time.perf_counter()
        for i, (row, seq, token) in enumerate(zip(rows, seqs, tokens)):
            if seq.first_token_at is None:
                seq.first_token_at = now
            if token is None:  # the constraint allows nothing more
                done.append((row, "stop"))
                continue
            p = seq.params
            seq.output_ids.append(token)
            self.generated_tokens += 1
            if seq.seen is not None:
                seq.seen[0, token] = True
            if seq.counts is not None:
                seq.counts[0, token] += 1
            if not p.ignore_eos and (token in self.eos_token_ids or token in p.stop_token_ids):
                done.append((row, "stop"))  # the stop token is not part of the output
                continue
            ev = Event(token_id=token)
            if i in lp_row:
                lp = logprobs[lp_row[i]]
                ev.logprob = float(lp[token])
                ev.top_logprobs = _top(lp, p.top_logprobs)
            self._send(seq, ev)
            if seq.constraint is not None:
                seq.constraint.advance(token)
                if seq.constraint.is_complete():
                    done.append((row, "stop"))
                    continue
            if len(seq.output_ids) >= p.max_new_tokens or seq.n_cached + 1 >= self.max_len:
                done.append((row, "length"))
                continue
            seq.pending = token
        for row, reason in sorted(done, reverse=True):  # highest row first: moves never touch a retired row
            self._retire(row, reason)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
        """One token per sequence with `lmforge.generation.api`'s controls. Rows with the same controls are processed
        as one batch; every row draws from its own generator, so its tokens do not depend on its neighbours."""
        out: list[int | None] = [None] * len(seqs)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            p = s.params
            key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty,
                   p.presence_penalty)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            params = seqs[idx[0]].params
            seen = torch.cat([seqs[i].seen for i in idx]) if seqs[idx[0]].seen is not None else None
            counts = torch.cat([seqs[i].counts for i in idx]) if seqs[idx[0]].counts is not None else None
            whole = len(idx) == len(seqs)  # one group (the usual case): no (b, V) copies by indexing
            scores = process_logits(logits if whole else logits[idx], params, seen, counts)  # (b, V)
            free = [j for j, i in enumerate(idx) if seqs[i].constraint is None]
            if free:
                sub = scores if len(free) == len(idx) else scores[free]
                picked = greedy(sub) if params.greedy else sample(sub, [seqs[idx[j]].generator for j in free])
                for j, t in zip(free, picked.tolist()):
                    out[idx[j]] = t
            for j, i in enumerate(idx):
                if seqs[i].constraint is not None:
                    out[i] = self._sample_constrained(seqs[i], scores[j], logits[i].float())
        return out

    @staticmethod
    def _sample_constrained(seq: Sequence, scores: torch.Tensor, raw: torch.Tensor) -> int | None:
        """Draw as usual; if the constraint refuses the token, draw again from the distribution restricted to
        the allowed tokens (renormalized). The result follows exactly that restricted distribution."""
        c, p = seq.constraint, seq.params

        def pick(s: torch.Tensor) -> int:
            return int(greedy(s[None])[0]) if p.greedy else int(sample(s[None], seq.generator)[0])

        token = pick(scores)
        if c.allows(token):
            return token
        candidates = c.candidates() if hasattr(c, "candidates") else range(scores.shape[-1])
        for pool in (scores, raw):  # the controlled distribution; if it allows nothing, the model's own
            allowed = [i for i in candidates if pool[i] > float("-inf") and c.allows(i)]
            if allowed:
                masked = torch.full_like(pool, float("-inf"))
                masked[allowed] = pool[allowed]
                return pick(masked)
        return None

    @staticmethod
    def _prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> list:
        """log p(prompt[j] | prompt[:j]) for j >= 1 with the top alternatives; None for the first. logits: (T, V)."""
        k = seq.prompt_logprobs or 0
        logprobs = F.log_softmax(logits[:-1].float(), dim=-1)  # (T-1, V): position j predicts token j+1
        targets = torch.tensor(seq.prompt_ids[1:], dtype=torch.long, device=logits.device)
        picked = logprobs.gather(1, targets[:, None])[:, 0].tolist() if len(targets) else []
        out: list = [None]
        for j, lp in enumerate(picked):
            out.append((lp, _top(logprobs[j], k)))
        return out

    def _send(self, seq: Sequence, ev: Event) -> None:
        """On the engine thread inside a phase: queue the event for `_flush_events`; elsewhere deliver it now."""
        if self._outbox is not None and threading.get_ident() == self._thread_id:
            self._outbox.append((seq, ev))
        else:
            self._deliver(seq, ev)

    def _flush_events(self) -> None:
        """Deliver the phase's events, each sequence's in order, back to back (one burst for the server)."""
        out, self._outbox = self._outbox, []
        for seq, ev in out or ():
            self._deliver(seq, ev)

    def _deliver(self, seq: Sequence, ev: Event) -> None:
        try:
            seq.on_event(ev)
        except Exception:  # a broken callback (e.g. its event loop closed) cancels that request, nothing else
            log.exception("event callback failed; cancelling the request")
            seq.cancelled = True

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finished:
            return
        seq.finished, seq.finish_reason = True, reason
        self._send(seq, Event(finish_reason=reason, error=self.error if reason == "error" else None))


class _OutputLayer(nn.Module):
    """A decode step's output layer on a CPU, computed as W (V, C) @ h^T instead of nn.Linear's h @ W^T: the same
    weights (not a copy) and the same sums, to float rounding; several times faster for a handful of rows.

    For a few rows h (B, C) against a large row-major W (V, C), PyTorch's CPU BLAS (MKL here) runs nn.Linear's
    h @ W^T slowly; written as W @ h^T, a tall matrix times B columns, it splits the V rows over the threads.
    Measured on bench_serve's model (V = 50257, C = 384, fp32, 2 threads): 1 row 7.1 -> 1.9 ms, 4 rows 12.2 ->
    2.9 ms, 16 rows 12.4 -> 8.9 ms (with 1 thread: 7.3 -> 3.6, 12.3 -> 6.5, 16 rows even). With tied embeddings
    this one product is most of a small model's decode step. A single row is sent twice: a matrix times one
    column goes to BLAS's matrix-vector routine, which runs on one thread."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.weight, self.bias = lm_head.weight, lm_head.bias  # (V, C), (V,) or None: the model's own tensors

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B = h.shape[0]
        cols = (torch.cat((h, h)) if B == 1 else h).t()  # (C, B or 2)
        y = torch.mm(self.weight, cols) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, cols)
        return y.t()[:B]  # (B, V), a transposed view (argmax and log_softmax take it as it is)


class _WithOutputLayer:
    """The model as `decode_step` sees it, with `_OutputLayer` as its output layer where that applies (a plain
    nn.Linear whose weight lies row-major in CPU memory; elsewhere, e.g. on a GPU or for a quantized layer, the
    model's own). Every other attribute is the model's."""

    def __init__(self, model: nn.Module):
        self._model = model
        head = model.lm_head
        fast = (type(head) is nn.Linear and head.weight.device.type == "cpu" and head.weight.is_contiguous()
                and head.weight.dtype == torch.float32)
        self.lm_head = _OutputLayer(head) if fast else head

    def __getattr__(self, name: str):  # only for names not set in __init__
        return getattr(self._model, name)


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of a (V,) row, most likely first."""
    if not k:
        return []
    vals, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), vals.tolist()))
