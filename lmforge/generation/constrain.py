"""Constrained decoding: make a model's output valid JSON (JSON mode), JSON that follows a schema, or a
well-formed tool call.

A language model samples one token at a time from a distribution over its whole vocabulary. To guarantee that
the output parses, we put a small automaton next to the sampler: it reads the bytes produced so far and says
which next token keeps the text a *prefix of some valid document*. The sampler draws a token as usual; if the
automaton refuses it, that token is removed and the draw is repeated (rejection sampling), which samples
exactly the model's distribution restricted to allowed tokens (renormalized). When the document is complete
generation ends with finish_reason "stop". The same idea, compiled to a token-level finite-state machine,
is what Outlines (Willard & Louf 2023) and llama.cpp grammars do; here it is interpreted byte by byte, which is
simple and fast enough because a draw is checked only against the tokens actually sampled.

What is checked: JSON *syntax* (RFC 8259) with an object at the top level, as OpenAI's
`response_format={"type": "json_object"}` promises; with a schema, also its structure (see `schema_machine` for
the supported subset). Runs of whitespace are capped (at most 2 bytes) so a model cannot stall in an endless
stream of spaces. Strings have no length limit unless the schema sets `maxLength`, so a model that never closes
its string runs until max_tokens (finish_reason "length", the same as OpenAI).

    c = json_constraint(vocabulary_bytes(tok, V))     # token_bytes[i] = the bytes token i adds to a text
    c.allows(tid); c.advance(tid); c.is_complete()    # the `TokenConstraint` protocol of the engine

`tool_call_constraint(token_bytes, {name: parameters_schema})` forces `{"name": ..., "arguments": {...}}` with
the arguments following the tool's JSON schema (`schema_machine`: the subset OpenAI's strict mode uses), and
`json_constraint(token_bytes, schema)` does the same for `response_format={"type": "json_schema", ...}`.

Who uses it: the Python API and the CLI (`lm.generate(prompt, json=True)` or `json_schema=schema`; `lmforge
generate MODEL PROMPT --json-schema schema.json`), through `request_constraints` and `next_tokens` below, which
the decode loop (`lmforge.generation.loop.decode_steps`) calls in place of its plain sampler; and the serving
engine (`lmforge.serve`), which builds the same constraints for `response_format` and forced tool calls.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import torch

from lmforge.errors import GenerationError, LmforgeError
from lmforge.generation.sampling import SamplingParams, greedy, process_logits, sample

def _shallow(obj):
    """`copy.copy` for the small machines below, several times faster: a machine is cloned for every token a
    constraint checks, tens of thousands of times in a step that checks a whole vocabulary."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


_WS = b" \n"  # a subset of JSON whitespace (no tabs, no carriage returns): still valid JSON
_MAX_WS = 2


class JsonMachine:
    """A byte-level pushdown automaton accepting prefixes of one JSON value (an object when `object_only`).

    >>> m = JsonMachine(); all(m.feed(b) for b in b'{"a": [1, 2.5e3, true]}'), m.complete
    (True, True)
    >>> JsonMachine().feed(ord('x'))
    False
    """

    def __init__(self, object_only: bool = True):
        self.stack: list[str] = []  # open containers: "{" or "["
        self.state = "start"  # start | value | key_or_end | key | colon | after | string | escape | unicode |
        #                       number | literal | done
        self.in_key = False
        self.literal = b""
        self.unicode_left = 0
        self.utf8 = _UTF8_START  # inside a string: the continuation bytes the current character still needs
        self.number = ""  # the number's text so far (checked by a tiny grammar)
        self.ws = 0
        self.object_only = object_only
        self.done = False

    @property
    def complete(self) -> bool:
        """A whole value has been read (a top-level number is complete as soon as it is a valid number)."""
        return self.done or (self.state == "number" and not self.stack and _number_complete(self.number))

    def clone(self) -> "JsonMachine":
        new = _shallow(self)
        new.stack = list(self.stack)
        return new

    # each `feed` consumes one byte and returns False (leaving the machine unusable) if it cannot continue
    def feed(self, b: int) -> bool:
        s = self.state
        if s == "string":
            if self.utf8[0]:  # in the middle of a multi-byte character
                return _utf8_feed(self, b)
            if b == 0x22:  # "
                self._end_value(key=self.in_key)
                return True
            if b == 0x5C:  # backslash
                self.state = "escape"
                return True
            return b >= 0x20 and _utf8_feed(self, b)  # control characters must be escaped
        if s in ("escape", "unicode"):
            return _escape_byte(self, b, resume="string")
        if s == "literal":
            if b != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._end_value()
            return True
        if s == "number":
            c = chr(b)
            if _number_prefix_ok(self.number + c):
                self.number += c
                return True
            if not _number_complete(self.number) or not self.stack:
                return False
            self._end_value()
            return self.feed(b)  # the byte after a number belongs to the container
        if b in _WS:
            if s in ("done",) or self.ws >= _MAX_WS:
                return False
            self.ws += 1
            return True
        self.ws = 0
        if s in ("start", "value"):
            return self._start_value(b)
        if s == "key_or_end":
            if b == ord("}"):
                return self._close("{")
            if b == 0x22:
                self.state, self.in_key = "string", True
                return True
            return False
        if s == "key":
            if b == 0x22:
                self.state, self.in_key = "string", True
                return True
            return False
        if s == "colon":
            if b == ord(":"):
                self.state = "value"
                return True
            return False
        if s == "array_first":
            if b == ord("]"):
                return self._close("[")
            return self._start_value(b)
        if s == "after":
            top = self.stack[-1]
            if b == ord(","):
                self.state = "key" if top == "{" else "value"
                return True
            if b == ord("}") and top == "{":
                return self._close("{")
            if b == ord("]") and top == "[":
                return self._close("[")
            return False
        return False  # done: nothing may follow

    def _start_value(self, b: int) -> bool:
        if self.state == "start" and self.object_only and b != ord("{"):
            return False
        if b == ord("{"):
            self.stack.append("{")
            self.state = "key_or_end"
        elif b == ord("["):
            self.stack.append("[")
            self.state = "array_first"
        elif b == 0x22:
            self.state, self.in_key = "string", False
        elif chr(b) in "-0123456789":
            self.state, self.number = "number", chr(b)
        elif b in b"tfn":
            self.state, self.literal = "literal", {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}[b]
        else:
            return False
        return True

    def _close(self, kind: str) -> bool:
        if not self.stack or self.stack[-1] != kind:
            return False
        self.stack.pop()
        self._end_value()
        return True

    def _end_value(self, key: bool = False) -> None:
        if key:
            self.state, self.in_key = "colon", False
        elif not self.stack:
            self.state, self.done = "done", True
        else:
            self.state = "after"


_NUMBER_PREFIX = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?)?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


MAX_NUMBER_LEN = 24  # characters: more digits than a float64 carries; stops a model typing digits forever


def _number_prefix_ok(s: str) -> bool:
    """Could `s` still grow into a JSON number? ('-', '0.', '1e' yes; '01', '1.e' no)."""
    return len(s) <= MAX_NUMBER_LEN and _NUMBER_PREFIX.fullmatch(s) is not None


def _number_complete(s: str) -> bool:
    return _NUMBER.fullmatch(s) is not None


class _Literal:
    def __init__(self, text: bytes):
        self.text, self.pos = text, 0

    def clone(self):
        return _shallow(self)

    def feed(self, b: int) -> bool:
        if self.pos < len(self.text) and self.text[self.pos] == b:
            self.pos += 1
            return True
        return False

    @property
    def complete(self) -> bool:
        return self.pos == len(self.text)


class SequenceMachine:
    """Parts matched one after the other; a byte a finished part refuses is offered to the next part."""

    def __init__(self, parts: list):
        self.parts, self.i = parts, 0

    def clone(self) -> "SequenceMachine":
        # parts before `i` are finished and never fed again: shared, not copied
        new = SequenceMachine([p if j < self.i else p.clone() for j, p in enumerate(self.parts)])
        new.i = self.i
        return new

    def feed(self, b: int) -> bool:
        i = self.i
        while i < len(self.parts):
            part = self.parts[i]
            if part.feed(b):
                self.i = i
                return True
            if not part.complete:
                return False
            i += 1
        return False

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts[self.i:])


class _String:
    """A JSON string (quotes included), at most `max_len` characters of content when given."""

    def __init__(self, max_len: int | None = None):
        self.state, self.n, self.max_len, self.unicode_left = "open", 0, max_len, 0
        self.utf8 = _UTF8_START

    def clone(self):
        return _shallow(self)

    def feed(self, b: int) -> bool:
        s = self.state
        if s == "open":
            if b == 0x22:
                self.state = "chars"
                return True
            return False
        if s == "chars":
            if self.utf8[0]:  # a continuation byte of the character already counted
                return _utf8_feed(self, b)
            if b == 0x22:
                self.state = "done"
                return True
            full = self.max_len is not None and self.n >= self.max_len
            if b == 0x5C and not full:
                self.state, self.n = "escape", self.n + 1
                return True
            if b < 0x20 or full or not _utf8_feed(self, b):
                return False
            self.n += 1  # count characters (at their first byte), not bytes
            return True
        if s in ("escape", "unicode"):
            return _escape_byte(self, b, resume="chars")
        return False

    @property
    def complete(self) -> bool:
        return self.state == "done"


class _Number:
    """A JSON number (an integer when `integer`)."""

    def __init__(self, integer: bool = False):
        self.text, self.integer = "", integer

    def clone(self):
        return _shallow(self)

    def feed(self, b: int) -> bool:
        c = chr(b)
        if self.integer and c in ".eE":
            return False
        if _number_prefix_ok(self.text + c):
            self.text += c
            return True
        return False

    @property
    def complete(self) -> bool:
        return _number_complete(self.text)


class _Array:
    """`[item, item, ...]` with items made by `make_item` (", " between them)."""

    def __init__(self, make_item):
        self.make_item, self.state, self.item, self.space = make_item, "open", None, False

    def clone(self):
        new = _shallow(self)
        new.item = self.item.clone() if self.item is not None else None
        return new

    def _start_item(self, b: int) -> bool:
        item = self.make_item()
        if item.feed(b):
            self.item, self.state = item, "item"
            return True
        return False

    def feed(self, b: int) -> bool:
        s = self.state
        if s == "open":
            if b == ord("["):
                self.state = "first"
                return True
            return False
        if s == "first":
            if b == ord("]"):
                self.state = "done"
                return True
            return self._start_item(b)
        if s == "item":
            if self.item.feed(b):
                return True
            if not self.item.complete:
                return False
            if b == ord(","):
                self.state = "comma"
                return True
            if b == ord("]"):
                self.state = "done"
                return True
            return False
        if s == "comma":
            if b == ord(" "):
                self.state = "next"
                return True
            return False
        if s == "next":
            return self._start_item(b)
        return False

    @property
    def complete(self) -> bool:
        return self.state == "done"


class _OneOf:
    """Any one of several machines, run side by side; those that refuse a byte drop out."""

    def __init__(self, alternatives: list):
        self.alts = alternatives

    def clone(self):
        return _OneOf([a.clone() for a in self.alts])

    def feed(self, b: int) -> bool:
        alive = []
        for a in self.alts:
            a = a.clone()
            if a.feed(b):
                alive.append(a)
        if not alive:
            return False
        self.alts = alive
        return True

    @property
    def complete(self) -> bool:
        return any(a.complete for a in self.alts)


def schema_machine(schema: Any, depth: int = 0):
    """A byte machine for the JSON documents a (subset of) JSON Schema describes.

    Supported: type object (every listed property, in order: OpenAI's strict mode makes all of them required),
    array (items), string (maxLength), integer, number, boolean, null, enum, const, anyOf/oneOf, a list of
    types. Anything else (or nesting deeper than 8) falls back to "any JSON value". Output is canonical:
    `{"a": 1, "b": [2, 3]}` (one space after ':' and ','), which is valid JSON and easy for a model to follow.
    >>> m = schema_machine({"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}})
    >>> all(m.feed(b) for b in b'{"unit": "f"}'), m.complete
    (True, True)
    """
    if not isinstance(schema, dict) or depth > 8:
        return JsonMachine(object_only=False)
    if "const" in schema:
        return _Literal(json.dumps(schema["const"], ensure_ascii=False).encode())
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return _OneOf([_Literal(json.dumps(v, ensure_ascii=False).encode()) for v in schema["enum"]])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _OneOf([schema_machine(s, depth + 1) for s in schema[key]])
    t = schema.get("type")
    if isinstance(t, list) and t:
        return _OneOf([schema_machine({**schema, "type": x}, depth + 1) for x in t])
    if t == "object" or (t is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            return JsonMachine(object_only=True)
        parts: list = []
        for i, (name, sub) in enumerate(props.items()):
            sep = "{" if i == 0 else ", "
            parts.append(_Literal((sep + json.dumps(name, ensure_ascii=False) + ": ").encode()))
            parts.append(schema_machine(sub, depth + 1))
        parts.append(_Literal(b"}"))
        return SequenceMachine(parts)
    if t == "array":
        items = schema.get("items", {})
        return _Array(lambda: schema_machine(items, depth + 1))
    if t == "string":
        ml = schema.get("maxLength")
        return _String(ml if isinstance(ml, int) and ml >= 0 else None)
    if t in ("integer", "number"):
        return _Number(integer=t == "integer")
    if t == "boolean":
        return _OneOf([_Literal(b"true"), _Literal(b"false")])
    if t == "null":
        return _Literal(b"null")
    return JsonMachine(object_only=False)


class ByteConstraint:
    """Adapts a byte machine to the engine's token-level `TokenConstraint` protocol."""

    def __init__(self, machine, token_bytes: list[bytes]):
        self.machine, self.token_bytes = machine, token_bytes
        self._by_first = _first_byte_index(token_bytes)

    def allows(self, token_id: int) -> bool:
        data = self.token_bytes[token_id] if 0 <= token_id < len(self.token_bytes) else b""
        if not data:
            return False
        m = self.machine.clone()
        return all(m.feed(b) for b in data)

    def candidates(self) -> list[int]:
        """A superset of the allowed tokens: those whose first byte the machine accepts now (fast to compute)."""
        out: list[int] = []
        for b, ids in self._by_first.items():
            if self.machine.clone().feed(b):
                out.extend(ids)
        return out

    def advance(self, token_id: int) -> None:
        for b in self.token_bytes[token_id]:
            if not self.machine.feed(b):
                raise ValueError(f"token {token_id} is not allowed here")  # the engine checks allows() first

    def is_complete(self) -> bool:
        return self.machine.complete


_FIRST_BYTE_CACHE: dict[int, dict[int, list[int]]] = {}


def _first_byte_index(token_bytes: list[bytes]) -> dict[int, list[int]]:
    """first byte -> ids of the tokens starting with it (cached per vocabulary table)."""
    key = id(token_bytes)
    idx = _FIRST_BYTE_CACHE.get(key)
    if idx is None:
        idx = {}
        for i, data in enumerate(token_bytes):
            if data:
                idx.setdefault(data[0], []).append(i)
        _FIRST_BYTE_CACHE.clear()  # one server, one vocabulary: keep only the latest table
        _FIRST_BYTE_CACHE[key] = idx
    return idx


def vocabulary_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """token_bytes for the constraints: id -> the bytes that token adds when it follows other text.

    That is what the server's decoder shows (it decodes each new token after the tokens before it), and not
    always what the token decodes to alone: a SentencePiece tokenizer (llama2.c's, or Llama 2's and Mistral's
    tokenizer.json with byte fallback) drops the "▁" space of the first token of a text, so "▁me" alone is b"me"
    but adds b" me" after "na". A constraint that read b"me" would let `{"na` + `▁me"` spell `"na me"`. So each
    token is decoded after a reference token and the reference's own bytes are cut off; for byte-level BPE this
    equals decoding it alone. Special tokens (and ids past the tokenizer's vocabulary) get b"": a constraint never
    lets them through.
    """
    specials = set((getattr(tokenizer, "special_tokens", None) or {}).values())
    ref = next((i for i in reversed(tokenizer.encode("a")) if i not in specials), None)
    before = tokenizer.decode_bytes([ref]) if ref is not None else b""
    out = []
    for i in range(vocab_size):
        if i in specials:
            out.append(b"")
            continue
        try:
            both = tokenizer.decode_bytes([ref, i]) if ref is not None else tokenizer.decode_bytes([i])
        except LmforgeError:  # the model's vocabulary is larger than the tokenizer's (padded embeddings)
            out.append(b"")
            continue
        out.append(both[len(before):] if both.startswith(before) else tokenizer.decode_bytes([i]))
    return out


def json_constraint(token_bytes: list[bytes], schema: dict | None = None) -> ByteConstraint:
    """JSON mode: the output is one JSON object (matching `schema` when one is given)."""
    machine = schema_machine(schema) if schema else JsonMachine(object_only=True)
    return ByteConstraint(machine, token_bytes)


def tool_call_constraint(token_bytes: list[bytes], tools: dict[str, dict | None]) -> ByteConstraint:
    """Forced function call `{"name": "<tool>", "arguments": <its parameters>}` for one of `tools`
    (name -> JSON schema of the parameters, or None for "any object")."""
    alts = []
    for name, params in tools.items():
        args = schema_machine(params) if params else JsonMachine(object_only=True)
        head = ('{"name": ' + json.dumps(name) + ', "arguments": ').encode()
        alts.append(SequenceMachine([_Literal(head), args, _Literal(b"}")]))
    return ByteConstraint(alts[0] if len(alts) == 1 else _OneOf(alts), token_bytes)


# UTF-8 inside strings (RFC 3629): a JSON text is UTF-8, so a string may not hold a byte sequence that is not a
# character. State: (continuation bytes still expected, lowest and highest value the next one may take). The ranges
# after E0, ED, F0 and F4 rule out overlong forms, UTF-16 surrogates and code points past U+10FFFF. Without this a
# byte-level model could write half a character and close the string: the text would decode to U+FFFD.
_UTF8_START = (0, 0, 0)
_UTF8_LEAD = {**{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}, 0xE0: (2, 0xA0, 0xBF),
              **{b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)}, 0xED: (2, 0x80, 0x9F), 0xF0: (3, 0x90, 0xBF),
              **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}, 0xF4: (3, 0x80, 0x8F)}


def _utf8_feed(machine, b: int) -> bool:
    """Advance `machine.utf8` by one string byte; False if the byte cannot be part of well-formed UTF-8 here.

    >>> m = _String(); m.feed(0x22), m.feed(0xC3), m.feed(0xA9), m.feed(0x22)   # "é"
    (True, True, True, True)
    >>> m = _String(); m.feed(0x22), m.feed(0xC3), m.feed(0x22)                 # half of é, then a quote
    (True, True, False)
    """
    left, lo, hi = machine.utf8
    if left:
        if not lo <= b <= hi:
            return False
        machine.utf8 = (left - 1, 0x80, 0xBF) if left > 1 else _UTF8_START
        return True
    if b < 0x80:
        return True
    nxt = _UTF8_LEAD.get(b)
    if nxt is None:  # a stray continuation byte, or a lead byte UTF-8 never uses
        return False
    machine.utf8 = nxt
    return True


def _escape_byte(machine, b: int, resume: str) -> bool:
    """One byte after a backslash inside a JSON string: one of `"\\/bfnrt`, or `u` and four hex digits.

    `machine.state` is "escape" (just after the backslash) or "unicode" (inside `\\uXXXX`); when the escape is
    complete the machine goes back to `resume`, the state that reads ordinary string bytes."""
    if machine.state == "escape":
        if b == ord("u"):
            machine.state, machine.unicode_left = "unicode", 4
            return True
        if b in b'"\\/bfnrt':
            machine.state = resume
            return True
        return False
    if chr(b) not in "0123456789abcdefABCDEF":
        return False
    machine.unicode_left -= 1
    if not machine.unicode_left:
        machine.state = resume
    return True


# ================================================================================================================
# Constrained sampling for the decode loop (the Python API and the CLI)
# ================================================================================================================


_VOCAB_BYTES: dict[tuple[int, int], tuple[Any, list[bytes]]] = {}


def cached_vocabulary_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """`vocabulary_bytes`, computed once per (tokenizer, vocabulary size): it decodes every id, which takes a
    moment on a 50k-token vocabulary. A few tables are kept (the tokenizer is held, so its id stays its own)."""
    key = (id(tokenizer), vocab_size)
    hit = _VOCAB_BYTES.get(key)
    if hit is None or hit[0] is not tokenizer:
        if len(_VOCAB_BYTES) >= 4:
            _VOCAB_BYTES.pop(next(iter(_VOCAB_BYTES)))
        hit = _VOCAB_BYTES[key] = (tokenizer, vocabulary_bytes(tokenizer, vocab_size))
    return hit[1]


def request_constraints(tokenizer, vocab_size: int, params: SamplingParams, n: int) -> list[ByteConstraint] | None:
    """One fresh constraint per row for a request whose params ask for JSON (`json=True` or `json_schema`), or
    None when they do not. Each row gets its own automaton: rows of a batch write different documents."""
    if not (params.json or params.json_schema is not None):
        return None
    if tokenizer is None:
        raise GenerationError("JSON-constrained generation needs the model's tokenizer (to know each token's bytes)")
    table = cached_vocabulary_bytes(tokenizer, vocab_size)
    return [json_constraint(table, params.json_schema) for _ in range(n)]


def pick_allowed(scores: torch.Tensor, raw: torch.Tensor, constraint, params: SamplingParams,
                 generator: torch.Generator | None, tries: int = 16) -> int | None:
    """One token for one row that `constraint` allows, from the distribution restricted to the allowed tokens
    (renormalized); greedy: the most likely allowed token. scores: (V,) the processed logits (penalties,
    temperature, top-k/p, min-p); raw: (V,) the model's own logits, used when the controls leave no allowed token.
    None: the constraint allows no token at all (the document is complete, or the vocabulary cannot continue it).

    How, without checking all V tokens at every step:
    1. draw as usual (argmax when greedy), the very draw the unconstrained sampler makes; allowed: done.
    2. refused: keep only the tokens whose first byte the automaton accepts (`candidates()`, cheap) and, greedy,
       walk them from the most likely down to the first allowed one; sampling, draw again with each refused
       token removed (sampling without replacement until a token is allowed gives every allowed token t
       probability p(t) / p(allowed), the restricted distribution exactly) ...
    3. ... up to `tries` times; then check every remaining candidate and draw once among the allowed ones.
    The serving engine (`serve.engine.Engine._sample_constrained`) samples the same distribution, checking every
    candidate at step 2 (slower on a 50k vocabulary; its random draws after a refusal differ).
    """
    token = int(greedy(scores[None])[0]) if params.greedy else int(sample(scores[None], generator)[0])
    if constraint.allows(token):
        return token
    ids = constraint.candidates() if hasattr(constraint, "candidates") else range(scores.shape[-1])
    candidates = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)  # (V,)
    candidates[torch.as_tensor(list(ids), dtype=torch.long, device=scores.device)] = True
    candidates[token] = False
    for pool in (scores, raw):  # the controlled distribution; if it allows nothing, the model's own
        token = _first_allowed(pool.masked_fill(~candidates, float("-inf")), constraint, params, generator, tries)
        if token is not None:
            return token
    return None


def _first_allowed(pool: torch.Tensor, constraint, params: SamplingParams, generator, tries: int) -> int | None:
    """Steps 2 and 3 of `pick_allowed` over `pool` (V,), where tokens ruled out already hold -inf."""
    n = int(torch.isfinite(pool).sum())
    if params.greedy:  # most likely first; ties keep the lower id first, as argmax does
        for t in torch.sort(pool, descending=True, stable=True).indices[:n].tolist():
            if constraint.allows(t):
                return t
        return None
    pool = pool.clone()
    for _ in range(min(tries, n)):
        t = _draw(pool, generator)
        if constraint.allows(t):
            return t
        pool[t] = float("-inf")
    allowed = [i for i in torch.isfinite(pool).nonzero()[:, 0].tolist() if constraint.allows(i)]
    if not allowed:
        return None
    keep = torch.full_like(pool, float("-inf"))  # (V,)
    keep[allowed] = pool[allowed]
    return _draw(keep, generator)


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from softmax(logits) (V,) by inverting the CDF: one uniform number and a binary search. The same
    distribution as `sampling.sample`; torch.multinomial over a 50k vocabulary is far slower on CPU, which counts
    here, where a step may redraw many times. Tokens at -inf have a flat CDF step and are never drawn."""
    cdf = logits.float().softmax(dim=-1).cumsum(dim=-1)  # (V,)
    u = torch.rand(1, generator=generator, device=logits.device) * cdf[-1]
    t = int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)[0])
    while not torch.isfinite(logits[t]):  # float rounding at the very top of the CDF: the last drawable token
        t -= 1
    return t


def next_tokens(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator] | None,
                constraints: Sequence, alive: Sequence[bool], seen: torch.Tensor | None = None,
                output_counts: torch.Tensor | None = None) -> list[int | None]:
    """The constrained counterpart of `sampling.sample_next_token`: (B, V) logits -> one allowed id per alive row
    (None for a row whose constraint allows nothing, and for rows already finished).

    Each row draws with its own generator, exactly as the unconstrained sampler does, so where the first draw is
    allowed the token is the one `sample_next_token` would have picked: a constraint changes a row's text only
    where the model's own choice would have broken the document.
    """
    scores = process_logits(logits, params, seen, output_counts)  # (B, V) fp32
    raw = logits.float()  # (B, V)
    out: list[int | None] = []
    for i, c in enumerate(constraints):
        if not alive[i]:
            out.append(None)
            continue
        g = generators[i] if generators is not None else None
        out.append(pick_allowed(scores[i], raw[i], c, params, g))
    return out
