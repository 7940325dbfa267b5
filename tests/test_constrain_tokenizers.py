"""Constrained decoding (JSON mode, JSON schemas, forced tool calls) for every tokenizer family lmforge loads that
generates: byte-level BPE, llama2.c's SentencePiece tokenizer and a SentencePiece-BPE tokenizer.json with byte
fallback (Llama 2's layout). WordPiece does not generate.

The check: pick tokens the constraint allows, at random (so space-prefixed "▁" pieces are drawn as often as any),
decode them the way the server does (each token after the prompt and the tokens before it), and parse the text.
Then the same through the HTTP server with llama2.c's stories260K, the model of issue 25."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.generation.stops import StopChecker
from lmforge.serve.constrain import json_constraint, tool_call_constraint, vocabulary_bytes
from tests.conftest import data_file

TOOLS = {"get_weather": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                          "unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}}},
         "get_time": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}}}}


def _bpe():
    from tests.test_serve_helpers import TEXT
    from lmforge.tokenizers.bpe import Tokenizer

    return Tokenizer.train([TEXT], vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)


def _llama2c():
    from lmforge.tokenizers.llama2c import Llama2cTokenizer

    return Llama2cTokenizer.load(data_file("stories260K/tok512.bin"))


def _sentencepiece_json():
    """A Llama-2-style tokenizer.json (Metaspace, BPE with byte fallback, Strip decoder), trained here."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    from lmforge.tokenizers.bpe import HFTokenizer
    from tests.test_serve_helpers import TEXT

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    data = json.loads(hf.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):  # the byte-fallback pieces, as in Llama 2's vocabulary ("{" is one of them here)
        vocab.setdefault(f"<0x{b:02X}>", max(vocab.values()) + 1)
    return HFTokenizer.from_hf_dict(data, bos_token="<s>", eos_token="</s>", add_bos_token=True)


FAMILIES = {"byte-level BPE": _bpe, "llama2.c SentencePiece": _llama2c,
            "SentencePiece tokenizer.json (byte fallback)": _sentencepiece_json}


def _random_constrained(tok, constraint, prompt_ids, rng, max_tokens=600) -> str:
    """Allowed tokens at random until the document is complete; the text as the server's decoder shows it."""
    decoder = StopChecker(tok, (), (), context_ids=prompt_ids)
    for _ in range(max_tokens):
        allowed = [i for i in constraint.candidates() if constraint.allows(i)]
        assert allowed, "the constraint allows no token before the document is complete"
        # half the draws favour tokens that close something, so free-form JSON ends; the rest are any allowed token
        closing = [i for i in allowed if any(c in constraint.token_bytes[i] for c in b'"}]')]
        t = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
        constraint.advance(t)
        decoder.push(t)
        if constraint.is_complete():
            return decoder.text + decoder.flush("stop")
    pytest.fail("no complete document within the token budget")


@pytest.mark.parametrize("family", FAMILIES)
def test_token_bytes_are_what_the_decoder_shows(family):
    tok = FAMILIES[family]()
    V = tok.vocab_size
    table = vocabulary_bytes(tok, V)
    context = tok.encode("Once upon a time")
    rng = random.Random(0)
    specials = set(tok.special_tokens.values())
    for t in rng.sample([i for i in range(V) if i not in specials], min(V - len(specials), 200)):
        shown = tok.decode_bytes(context + [t])[len(tok.decode_bytes(context)):]
        assert table[t] == shown, (t, table[t], shown)
    assert all(table[i] == b"" for i in specials)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["tool_call", "json_schema", "json_object"])
def test_constrained_output_parses(family, kind):
    tok = FAMILIES[family]()
    table = vocabulary_bytes(tok, tok.vocab_size)
    prompt = tok.encode("What is the weather in Paris? Answer:")
    for seed in range(4):
        if kind == "tool_call":
            c = tool_call_constraint(table, TOOLS)
        else:
            c = json_constraint(table, SCHEMA if kind == "json_schema" else None)
        text = _random_constrained(tok, c, prompt, random.Random(seed))
        doc = json.loads(text)
        if kind == "tool_call":
            assert doc["name"] in TOOLS and set(doc["arguments"]) == set(TOOLS[doc["name"]]["properties"])
        elif kind == "json_schema":
            assert set(doc) == {"name", "ok", "tags"} and isinstance(doc["ok"], bool)
        else:
            assert isinstance(doc, dict)


# ---- through the server, with llama2.c's stories260K ----------------------------------------------------------------
@pytest.fixture(scope="module")
def stories_server():
    from tests.test_serve_helpers import ServerThread
    import lmforge
    from lmforge.serve.app import ServerSettings, create_app

    lm = lmforge.load(data_file("stories260K/stories260K.bin"), tokenizer=data_file("stories260K/tok512.bin"))
    srv = ServerThread(create_app(lm, ServerSettings(model_name="stories")))
    yield srv
    srv.stop()


def test_stories260k_tool_call_and_json_schema_through_the_server(stories_server):
    import httpx

    tools = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in TOOLS.items()]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    small = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "ok": {"type": "boolean"}}}
    for temperature, seed in ((0, None), (1.0, 1), (1.0, 2)):
        body = {"model": "stories", "messages": msgs, "tools": tools, "tool_choice": "required",
                "max_tokens": 100, "temperature": temperature, **({"seed": seed} if seed is not None else {})}
        r = httpx.post(stories_server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["finish_reason"] == "tool_calls", ch
        call = ch["message"]["tool_calls"][0]["function"]
        assert call["name"] in TOOLS and set(json.loads(call["arguments"])) == set(TOOLS[call["name"]]["properties"])

        body = {"model": "stories", "messages": msgs, "max_tokens": 100, "temperature": temperature,
                "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": small}},
                **({"seed": seed} if seed is not None else {})}
        r = httpx.post(stories_server.url + "/v1/chat/completions", json=body, timeout=60)
        ch = r.json()["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        assert set(json.loads(ch["message"]["content"])) == {"name", "ok"}
