"""Text at the edges: incremental detokenization and stop strings.

Text lives at the edges. The decode loop speaks token ids; `StopChecker` turns one row's ids into text deltas
incrementally: it never splits a multi-byte UTF-8 character across deltas (tokens are bytes, a character can span
two tokens), it finds stop strings that span token boundaries, and it holds back text that might be the start of a
stop string so the stop text itself is never emitted.
"""

from __future__ import annotations

import codecs
from typing import Sequence


class StopChecker:
    """Follows one sequence's generated tokens and turns them into safe-to-show text deltas.

        checker = StopChecker(tok, stop=["\\n\\n"], stop_token_ids=[eos], context_ids=prompt_ids)
        for tok_id in ...: delta = checker.push(tok_id); show(delta); if checker.finished: break
        show(checker.flush())

    Tokens are bytes. A token's bytes are found by decoding it after a few context tokens and cutting the context's
    bytes off (SentencePiece-style decoders drop a leading space at the very start of a text, so a token decoded
    alone can lose its space). Bytes go through an incremental UTF-8 decoder, which holds back an unfinished
    multi-byte character until its last byte arrives. Stop strings are searched in the whole text so far, so one
    split over several tokens is found; text that could still become a stop string is held back.
    `finish_reason` is "stop" (stop token or string) or "length" (set by the caller through `flush`).
    """

    CONTEXT = 4  # tokens of left context used to decode each new token

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stop_token_ids = set(stop_token_ids)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._context = list(context_ids)[-self.CONTEXT:]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []  # generated tokens, stop token excluded
        self._text = ""  # all text decoded so far
        self.emitted = 0  # characters of _text already handed out
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None  # the stop string or token id that ended generation
        self.logprobs: list[float] | None = None  # filled by the decode loop when asked for
        self.top_logprobs: list[dict[int, float]] | None = None

    @property
    def text(self) -> str:
        """The completion so far as it will be returned (held-back text excluded)."""
        return self._text[:self.emitted]

    def _token_bytes(self, token_id: int) -> bytes:
        if self.tokenizer is None:
            return b""
        ctx = self._context
        if not ctx:
            data = self.tokenizer.decode_bytes([token_id])
        else:
            before = self.tokenizer.decode_bytes(ctx)
            both = self.tokenizer.decode_bytes(ctx + [token_id])
            data = both[len(before):] if both.startswith(before) else self.tokenizer.decode_bytes([token_id])
        self._context = (ctx + [token_id])[-self.CONTEXT:]
        return data

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new text that is safe to show (may be "")."""
        if self.finished:
            return ""
        if token_id in self.stop_token_ids:
            self.finished, self.finish_reason, self.stop_reason = True, "stop", token_id
            return self.flush_utf8()
        self.token_ids.append(token_id)
        start = max(0, len(self._text) - self._max_stop + 1) if self.stop else len(self._text)
        self._text += self._utf8.decode(self._token_bytes(token_id))
        if self.stop:
            hit = self._find_stop(start)
            if hit is not None:
                pos, s = hit
                self._text = self._text[:pos]
                self.finished, self.finish_reason, self.stop_reason = True, "stop", s
                return self._emit(len(self._text))
            return self._emit(len(self._text) - self._partial_stop_suffix())
        return self._emit(len(self._text))

    def flush(self, finish_reason: str = "length") -> str:
        """End of generation without a stop: emit everything held back (an unfinished character becomes U+FFFD)."""
        if not self.finished:
            self.finished, self.finish_reason = True, finish_reason
        return self.flush_utf8()

    def flush_utf8(self) -> str:
        if self.finish_reason == "stop" and self.stop_reason in self.stop:
            return ""
        self._text += self._utf8.decode(b"", final=True)
        if self.stop:  # the tail could complete a stop string only with bytes that never came
            hit = self._find_stop(max(0, self.emitted - self._max_stop + 1))
            if hit is not None:
                self._text = self._text[:hit[0]]
                self.finish_reason, self.stop_reason = "stop", hit[1]
        return self._emit(len(self._text))

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """Earliest occurrence of any stop string at or after `start` (only new text can hold a new match)."""
        best = None
        for s in self.stop:
            i = self._text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the text that is a proper prefix of a stop string (must be held back)."""
        text, n = self._text, 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), n, -1):
                if text.endswith(s[:k]):
                    n = k
                    break
        return n

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self._text[self.emitted:upto]
        self.emitted = upto
        return delta
