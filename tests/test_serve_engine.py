"""The continuous-batching engine and the constrained-decoding machines, without HTTP.

The engine's contract: a request's tokens do not depend on what else is in the batch. We check it against
`lmforge.generation.loop.generate_ids` (one prompt at a time, GEN's decode loop) for greedy, seeded sampling and the
penalties, with many requests submitted at once from several threads and rows joining and leaving the batch.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch

from lmforge.models.config import ModelConfig
from lmforge.errors import GenerationError
from lmforge.generation.loop import generate_ids, token_logprobs
from lmforge.generation.sampling import SamplingParams
from lmforge.models.decoder import Transformer
from lmforge.serve.constrain import JsonMachine, json_constraint, schema_machine, tool_call_constraint
from lmforge.serve.engine import Engine, EngineBusyError, EngineStoppedError, Event


def tiny_model(family: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    extra = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2) if family == "llama" else {}
    cfg = ModelConfig(vocab_size=97, block_size=96, n_layer=2, n_head=4, n_embd=32, init_std=0.3, **extra)
    return Transformer(cfg).eval()


PARAMS = [
    SamplingParams(max_new_tokens=12, temperature=0),
    SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11),
    SamplingParams(max_new_tokens=9, temperature=1.2, top_k=20, min_p=0.01, seed=5, frequency_penalty=0.7,
                   presence_penalty=0.4, repetition_penalty=1.3),
    SamplingParams(max_new_tokens=7, temperature=0, stop_token_ids=[3, 4, 5, 6, 7, 8]),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_concurrent_requests_equal_solo_generation(family):
    model = tiny_model(family)
    rng = random.Random(0)
    jobs = [([rng.randrange(97) for _ in range(rng.randint(1, 20))], PARAMS[i % len(PARAMS)]) for i in range(24)]
    solo = [generate_ids(model, [p], params)[0].token_ids for p, params in jobs]
    engine = Engine(model, max_batch=6, max_len=96).start()
    try:
        results = [None] * len(jobs)

        def run(i):
            results[i] = engine.generate(*jobs[i], timeout=120)

        # Hold the engine thread until every request is queued, so batching does not depend on thread timing
        # (on a loaded 2-core CI box the first requests could finish before the last ones arrived).
        gate = threading.Event()
        held = threading.Event()
        engine.call(lambda: (held.set(), gate.wait(60)))
        assert held.wait(60)  # the engine thread is parked: nothing is admitted until the gate opens
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.queue_depth() < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join()
        assert results == solo
        assert engine.steps > 0 and engine.batch_size_sum / engine.steps > 1.5  # rows really shared forwards
        assert engine.num_active() == 0 and engine.queue_depth() == 0
    finally:
        engine.shutdown()


def test_eos_and_stop_tokens_end_a_sequence_without_emitting_them():
    model = tiny_model("gpt2")
    prompt = [1, 2, 3]
    free = generate_ids(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0))[0].token_ids
    eos = free[3]
    engine = Engine(model, max_batch=2, eos_token_ids=[eos]).start()
    try:
        events: list[Event] = []
        done = threading.Event()
        engine.submit(prompt, SamplingParams(max_new_tokens=8, temperature=0),
                      lambda ev: (events.append(ev), ev.finish_reason and done.set()))
        assert done.wait(30)
        assert [e.token_id for e in events if e.token_id is not None] == free[:free.index(eos)]
        assert events[-1].finish_reason == "stop"
        out = engine.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True), timeout=30)
        assert out == free
    finally:
        engine.shutdown()


def test_prompt_logprobs_and_token_logprobs_match_the_reference():
    model = tiny_model("llama")
    prompt = [5, 17, 3, 44, 9, 12]
    ref_lp, ref_greedy, ref_top = token_logprobs(model, [prompt], [1], top_logprobs=2)[0]
    engine = Engine(model, max_batch=2).start()
    try:
        events: list[Event] = []
        done = threading.Event()
        engine.submit(prompt, SamplingParams(max_new_tokens=3, temperature=0, logprobs=True, top_logprobs=2),
                      lambda ev: (events.append(ev), ev.finish_reason and done.set()), prompt_logprobs=2)
        assert done.wait(30)
        plp = events[0].prompt_logprobs
        assert plp[0] is None and len(plp) == len(prompt)
        torch.testing.assert_close([lp for lp, _ in plp[1:]], ref_lp, atol=1e-5, rtol=1e-5)
        for (_, top), ref in zip(plp[1:], ref_top):
            assert [i for i, _ in top] == list(ref) and [v for _, v in top] == pytest.approx(list(ref.values()))
        ref = generate_ids(model, [prompt], SamplingParams(max_new_tokens=3, temperature=0, logprobs=True))[0]
        toks = [e for e in events if e.token_id is not None]
        assert [e.token_id for e in toks] == ref.token_ids
        torch.testing.assert_close([e.logprob for e in toks], ref.logprobs, atol=1e-5, rtol=1e-5)
        assert all(e.top_logprobs[0][0] == e.token_id for e in toks)  # greedy: the chosen one is the top one
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family,prefill_tokens", [("gpt2", 2048), ("llama", 2048), ("llama", 24)])
def test_requests_admitted_together_share_a_left_padded_prefill(family, prefill_tokens):
    """Held back, then released at once: the queued requests are prefilled in a few padded forwards (a small
    token budget splits them) and each still gets exactly its solo tokens and prompt logprobs. A short prompt
    prefilled beside a long one keeps its whole context window (the padding does not stay in its cache)."""
    model = tiny_model(family)
    max_len = 64
    rng = random.Random(1)
    jobs = []
    for i in range(10):
        prompt = [rng.randrange(97) for _ in range(rng.choice([1, 3, 7, 12, 20]))]
        params = PARAMS[i % len(PARAMS)]
        jobs.append((prompt, params, None))
    jobs.append(([4, 9], SamplingParams(max_new_tokens=max_len - 2, temperature=0, ignore_eos=True), None))
    jobs.append(([5, 17, 3, 44, 9, 12], SamplingParams(max_new_tokens=3, temperature=0), 2))  # echo + tokens
    jobs.append(([8, 1, 30], SamplingParams(max_new_tokens=0), 1))  # score only
    engine = Engine(model, max_batch=len(jobs), max_len=max_len, prefill_tokens=prefill_tokens).start()
    try:
        gate = threading.Event()
        engine.call(gate.wait)  # hold the engine thread: every request below waits, then is admitted together
        events = [[] for _ in jobs]
        done = [threading.Event() for _ in jobs]
        for i, (prompt, params, plp) in enumerate(jobs):
            engine.submit(prompt, params, lambda ev, i=i: (events[i].append(ev), ev.finish_reason and done[i].set()),
                          prompt_logprobs=plp)
        gate.set()
        assert all(d.wait(60) for d in done)
        assert 2 <= engine.prefills < len(jobs)  # echo prompts have their own batch; nothing prefilled alone
        for (prompt, params, plp), evs in zip(jobs, events):
            tokens = [e.token_id for e in evs if e.token_id is not None]
            assert tokens == generate_ids(model, [prompt], params)[0].token_ids
            assert evs[-1].finish_reason in ("stop", "length")
            if plp is not None:
                ref_lp, _, ref_top = token_logprobs(model, [prompt], [1], top_logprobs=plp)[0]
                got = evs[0].prompt_logprobs
                assert got[0] is None and len(got) == len(prompt)
                torch.testing.assert_close([lp for lp, _ in got[1:]], ref_lp, atol=1e-5, rtol=1e-5)
                assert [[i for i, _ in top] for _, top in got[1:]] == [list(r) for r in ref_top]
        assert len(events[10]) == max_len - 2 + 1  # the short prompt beside long ones kept its full window
    finally:
        engine.shutdown()


def test_max_tokens_zero_only_scores_the_prompt():
    engine = Engine(tiny_model("gpt2"), max_batch=1).start()
    try:
        events = []
        done = threading.Event()
        engine.submit([1, 2, 3], SamplingParams(max_new_tokens=0), lambda ev: (events.append(ev),
                      ev.finish_reason and done.set()), prompt_logprobs=0)
        assert done.wait(30)
        assert len(events[0].prompt_logprobs) == 3 and events[-1].finish_reason == "length"
        assert not any(e.token_id is not None for e in events)
    finally:
        engine.shutdown()


def test_cancel_frees_the_slot_and_queue_limits():
    model = tiny_model("gpt2")
    engine = Engine(model, max_batch=1, max_queue=1).start()
    try:
        gate = threading.Event()
        engine.call(gate.wait)  # hold the engine thread so the queue fills deterministically
        finished = {}
        long = SamplingParams(max_new_tokens=80, temperature=0, ignore_eos=True)
        a = engine.submit([1, 2], long, lambda ev: ev.finish_reason and finished.setdefault("a", ev.finish_reason))
        with pytest.raises(EngineBusyError):
            engine.submit([1, 2], long, lambda ev: None)
        engine.cancel(a)
        gate.set()
        out = engine.generate([3, 4], SamplingParams(max_new_tokens=4, temperature=0), timeout=30)
        assert len(out) == 4 and finished["a"] == "cancelled" and len(a.output_ids) == 0
        # a running sequence cancelled midway stops within a step and frees its row
        got, started = [], threading.Event()
        b = engine.submit([5, 6], long, lambda ev: (got.append(ev), started.set()))
        assert started.wait(30)
        engine.cancel(b)
        engine.generate([7], SamplingParams(max_new_tokens=2, temperature=0), timeout=30)
        assert b.finish_reason == "cancelled" and len(b.output_ids) < 80 and engine.num_active() == 0
    finally:
        engine.shutdown()
    with pytest.raises(EngineStoppedError):
        engine.submit([1], SamplingParams(max_new_tokens=1), lambda ev: None)


def test_bad_requests_are_refused_up_front():
    engine = Engine(tiny_model("gpt2"), max_batch=1, max_len=32).start()
    try:
        with pytest.raises(GenerationError, match="context window"):
            engine.submit([1] * 30, SamplingParams(max_new_tokens=5), lambda ev: None)
        with pytest.raises(GenerationError, match="outside the vocabulary"):
            engine.submit([1, 500], SamplingParams(max_new_tokens=1), lambda ev: None)
        with pytest.raises(GenerationError, match="empty"):
            engine.submit([], SamplingParams(max_new_tokens=1), lambda ev: None)
    finally:
        engine.shutdown()


# ---- constrained decoding -------------------------------------------------------------------------------------
def _accepts(machine, text: str) -> bool:
    return all(machine.feed(b) for b in text.encode()) and machine.complete


@pytest.mark.parametrize("text,ok", [
    ('{"a": 1, "b": [true, false, null, -0.5e+3], "c": {"d": "x\\u00e9\\n"}}', True),
    ("{}", True), ('{"a":01}', False), ('{"a" 1}', False), ("[1]", False), ('{"a":1,}', False),
    ('{"a": tru}', False), ('{"a": "\x01"}', False), ("{\t}", False),
])
def test_json_machine_accepts_exactly_json_objects(text, ok):
    assert _accepts(JsonMachine(), text) is ok
    if ok:
        json.loads(text)


def test_schema_machine_follows_the_schema():
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}},
                                               "ok": {"type": "boolean"}, "x": {"anyOf": [{"type": "null"},
                                                                                            {"type": "number"}]}}}
    good = '{"unit": "f", "days": 12, "tags": ["a", "b"], "ok": true, "x": -1.5}'
    assert _accepts(schema_machine(schema), good)
    assert json.loads(good)["days"] == 12
    for bad in ['{"unit": "k", "days": 1, "tags": [], "ok": true, "x": null}',
                '{"unit": "c", "days": 1.5, "tags": [], "ok": true, "x": null}',
                '{"days": 1, "unit": "c", "tags": [], "ok": true, "x": null}']:
        assert not _accepts(schema_machine(schema), bad)


def test_constrained_sampling_always_produces_valid_json():
    """A random model, constrained: every completed output parses, for greedy and sampled decoding."""
    model = tiny_model("llama", seed=3)
    # a toy byte vocabulary: ids 0-94 are the printable ASCII characters, 95-96 are two-character tokens
    token_bytes = [bytes([32 + i]) for i in range(95)] + [b'{"', b'":']
    engine = Engine(model, max_batch=4, max_len=96).start()
    try:
        schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "n": {"type": "integer"}}}
        for i in range(6):
            params = SamplingParams(max_new_tokens=80, temperature=0 if i == 0 else 1.0, seed=i)
            c = json_constraint(token_bytes, schema if i % 2 else None)
            done, out = threading.Event(), []
            engine.submit([1, 2, 3], params, lambda ev: (out.append(ev), ev.finish_reason and done.set()), c)
            assert done.wait(60)
            text = b"".join(token_bytes[e.token_id] for e in out if e.token_id is not None).decode()
            if out[-1].finish_reason == "stop":
                obj = json.loads(text)
                assert isinstance(obj, dict)
                if i % 2:
                    assert list(obj) == ["unit", "n"] and obj["unit"] in ("c", "f")
            else:  # ran out of tokens: still a valid prefix
                m = JsonMachine()
                assert all(m.feed(b) for b in text.encode())
        c = tool_call_constraint(token_bytes, {"get_weather": {"type": "object", "properties":
                                                              {"unit": {"enum": ["c", "f"]}}}, "noop": None})
        done, out = threading.Event(), []
        engine.submit([4, 5], SamplingParams(max_new_tokens=80, temperature=0), lambda ev: (out.append(ev),
                      ev.finish_reason and done.set()), c)
        assert done.wait(60)
        text = b"".join(token_bytes[e.token_id] for e in out if e.token_id is not None).decode()
        assert out[-1].finish_reason == "stop", text
        call = json.loads(text)
        assert call["name"] in ("get_weather", "noop") and isinstance(call["arguments"], dict)
    finally:
        engine.shutdown()


def test_run_on_the_calling_thread_serves_until_shutdown():
    """`lmforge serve` runs the loop on its main thread (`Engine.run`): same tokens, and `run` returns once another
    thread shuts the engine down (the HTTP thread does, when uvicorn exits)."""
    model = tiny_model("llama")
    prompt, params = [5, 17, 3], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    engine = Engine(model, max_batch=2).start(thread=False)
    assert engine.start() is engine  # the app's lifespan finds it running and starts no thread
    results = {}

    def client():
        results["ids"] = engine.generate(prompt, params, timeout=60)
        engine.shutdown()

    t = threading.Thread(target=client)
    t.start()
    engine.run()  # returns at shutdown
    t.join(60)
    assert results["ids"] == generate_ids(model, [prompt], params)[0].token_ids


def test_output_layer_matches_the_models_own():
    """The engine's W @ h^T output layer gives nn.Linear's logits (to float rounding) for 1 and several rows."""
    from lmforge.serve.engine import _OutputLayer

    model = tiny_model("gpt2")
    head = _OutputLayer(model.lm_head)
    for B in (1, 3):
        h = torch.randn(B, model.config.n_embd)
        torch.testing.assert_close(head(h), model.lm_head(h), atol=1e-5, rtol=1e-5)
