"""Constrained decoding: make a model's output valid JSON (JSON mode) or a well-formed tool call.

A language model samples one token at a time from a distribution over its whole vocabulary. To guarantee that
the output parses, we put a small automaton next to the sampler: it reads the bytes produced so far and says
which next token keeps the text a *prefix of some valid document*. The engine draws a token as usual; if the
automaton refuses it, that token is removed and the draw is repeated (rejection sampling), which samples
exactly the model's distribution restricted to allowed tokens (renormalized). When the document is complete
the request ends with finish_reason "stop". The same idea, compiled to a token-level finite-state machine,
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
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any
from lmforge.errors import LmforgeError

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
        self.number = ""  # the number's text so far (checked by a tiny grammar)
        self.ws = 0
        self.object_only = object_only
        self.done = False

    @property
    def complete(self) -> bool:
        """A whole value has been read (a top-level number is complete as soon as it is a valid number)."""
        return self.done or (self.state == "number" and not self.stack and _number_complete(self.number))

    def clone(self) -> "JsonMachine":
        new = copy.copy(self)
        new.stack = list(self.stack)
        return new

    # each `feed` consumes one byte and returns False (leaving the machine unusable) if it cannot continue
    def feed(self, b: int) -> bool:
        s = self.state
        if s == "string":
            if b == 0x22:  # "
                self._end_value(key=self.in_key)
                return True
            if b == 0x5C:  # backslash
                self.state = "escape"
                return True
            return b >= 0x20  # control characters must be escaped
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
        return copy.copy(self)

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
        new = SequenceMachine([p.clone() for p in self.parts])
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

    def clone(self):
        return copy.copy(self)

    def feed(self, b: int) -> bool:
        s = self.state
        if s == "open":
            if b == 0x22:
                self.state = "chars"
                return True
            return False
        if s == "chars":
            if b == 0x22:
                self.state = "done"
                return True
            full = self.max_len is not None and self.n >= self.max_len
            if b == 0x5C and not full:
                self.state, self.n = "escape", self.n + 1
                return True
            if b < 0x20 or full:
                return False
            if not 0x80 <= b < 0xC0:  # count characters, not UTF-8 continuation bytes
                self.n += 1
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
        return copy.copy(self)

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
        new = copy.copy(self)
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
