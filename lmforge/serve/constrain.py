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
`response_format={"type": "json_object"}` promises. A JSON schema (`json_schema` response format) is not
enforced beyond that: the server validates the result parses and documents the gap. Runs of whitespace are
capped (at most 2 bytes) so a model cannot stall in an endless stream of spaces.

    c = JsonConstraint.for_tokens(token_bytes)        # token_bytes[i] = the bytes token i decodes to
    c.allows(tid); c.advance(tid); c.is_complete()    # the `TokenConstraint` protocol of the engine

`tool_call_constraint(token_bytes, names)` forces `{"name": "<one of names>", "arguments": {...}}`.
"""

from __future__ import annotations

import copy
import re

_WS = b" \t\n\r"
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
        self.complete = False

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
        if s == "escape":
            if b == ord("u"):
                self.state, self.unicode_left = "unicode", 4
                return True
            if b in b'"\\/bfnrt':
                self.state = "string"
                return True
            return False
        if s == "unicode":
            if chr(b) not in "0123456789abcdefABCDEF":
                return False
            self.unicode_left -= 1
            if not self.unicode_left:
                self.state = "string"
            return True
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
            self.state, self.complete = "done", True
        else:
            self.state = "after"


_NUMBER_PREFIX = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?)?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _number_prefix_ok(s: str) -> bool:
    """Could `s` still grow into a JSON number? ('-', '0.', '1e' yes; '01', '1.e' no)."""
    return _NUMBER_PREFIX.fullmatch(s) is not None


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


class _Choice:
    """One of several byte strings (a function name)."""

    def __init__(self, options: list[bytes]):
        self.options, self.prefix = options, b""

    def clone(self):
        return copy.copy(self)

    def feed(self, b: int) -> bool:
        p = self.prefix + bytes([b])
        if any(o.startswith(p) for o in self.options):
            self.prefix = p
            return True
        return False

    @property
    def complete(self) -> bool:
        return self.prefix in self.options


class SequenceMachine:
    """Parts matched one after the other; a byte a finished part refuses is offered to the next part."""

    def __init__(self, parts: list):
        self.parts, self.i = parts, 0

    def clone(self) -> "SequenceMachine":
        new = SequenceMachine([p.clone() for p in self.parts])
        new.i = self.i
        return new

    def feed(self, b: int) -> bool:
        while self.i < len(self.parts):
            part = self.parts[self.i]
            if part.feed(b):
                return True
            if not part.complete:
                return False
            self.i += 1
        return False

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts[self.i:])


class ByteConstraint:
    """Adapts a byte machine to the engine's token-level `TokenConstraint` protocol."""

    def __init__(self, machine, token_bytes: list[bytes]):
        self.machine, self.token_bytes = machine, token_bytes

    def allows(self, token_id: int) -> bool:
        data = self.token_bytes[token_id] if token_id < len(self.token_bytes) else b""
        if not data:
            return False
        m = self.machine.clone()
        return all(m.feed(b) for b in data)

    def advance(self, token_id: int) -> None:
        for b in self.token_bytes[token_id]:
            if not self.machine.feed(b):
                raise ValueError(f"token {token_id} is not allowed here")  # the engine checks allows() first

    def is_complete(self) -> bool:
        return self.machine.complete


def json_constraint(token_bytes: list[bytes]) -> ByteConstraint:
    """JSON mode: the output is one JSON object."""
    return ByteConstraint(JsonMachine(object_only=True), token_bytes)


def tool_call_constraint(token_bytes: list[bytes], names: list[str]) -> ByteConstraint:
    """Forced function call: `{"name": "<one of names>", "arguments": {...}}`."""
    parts = [_Literal(b'{"name": "'), _Choice([n.encode() for n in names]), _Literal(b'", "arguments": '),
             JsonMachine(object_only=True), _Literal(b"}")]
    return ByteConstraint(SequenceMachine(parts), token_bytes)
