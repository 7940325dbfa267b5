"""Chunking: a document -> passages that each fit the embedder, cut where the text itself pauses.

Why chunk at all? An embedder reads at most `max_tokens` tokens (256 for all-MiniLM-L6-v2) and ignores the rest,
and one vector for a whole book would average away every detail. So we cut documents into passages ("chunks"),
embed each one, and retrieve passages rather than files.

How big? Small chunks are precise but lose context ("it was founded in 1911" - what was?); large ones keep context
but mix topics, which blurs their vector. A common choice is a few hundred tokens with some *overlap*, so a fact
that straddles a cut appears whole in at least one chunk.

Counted in what? In the embedder's own tokens (`embedder.count_tokens`), never in characters or words: 1,000
characters of English are ~220 WordPiece tokens, of Chinese ~1,000, and a long URL or emoji run can be far more.
The invariant, checked by property tests on CJK, emoji and very long words, is

    embedder.count_tokens(chunk.text) <= max_tokens        for every chunk

Where to cut? Recursively, at the coarsest boundary that works (as LangChain's RecursiveCharacterTextSplitter
does, but counting tokens): the text is split into paragraphs (blank lines), a paragraph that is too long into
sentences, a sentence into words, and a single word longer than the limit (a hash, a URL, CJK text without spaces)
into the longest prefixes that fit. These pieces are then packed greedily into chunks; when a chunk is full it ends
at the last paragraph boundary inside it if that keeps it at least half full, otherwise at a sentence boundary.
The next chunk starts up to `overlap_tokens` earlier, in whole pieces.

Token counts are not exactly additive (a tokenizer may merge across a cut), so packing uses the sum of piece counts
as an estimate and then checks the real count of the chunk's text, dropping pieces until it fits.

Every chunk keeps where it came from: document id, source, character offsets `start:end` into the document text
(`doc.text[start:end] == chunk.text`), and the page (for PDFs).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable

from lmforge.errors import ConfigError
from lmforge.rag.loaders import Document


@dataclass
class Chunk:
    doc_id: str
    source: str
    index: int  # position within its document, from 0
    start: int  # character offsets into the document's text
    end: int
    text: str
    page: int | None = None
    n_tokens: int = 0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ChunkerSettings:
    max_tokens: int
    overlap_tokens: int


_PARA = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_SENT = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]+[\u300d\u300f\uff09]*\s*")
_SPACE = re.compile(r"\S+\s*")


def _cuts(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Split text[start:end] after every match of `pattern`; the spans cover the range exactly.

    >>> _cuts("One. Two. ", 0, 10, _SENT)
    [(0, 5), (5, 10)]
    """
    spans, s = [], start
    for m in pattern.finditer(text, start, end):
        if m.end() > s and m.end() < end:
            spans.append((s, m.end()))
            s = m.end()
    spans.append((s, end))
    return spans


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace: (_trim('  ab ', 0, 5)) -> (2, 4)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class Chunker:
    """Cut documents into chunks of at most `max_tokens` of `count_tokens`, overlapping by up to `overlap_tokens`.

    `Chunker.for_embedder(embedder, max_tokens=None, overlap_tokens=32)` counts with the embedder's tokenizer and
    caps `max_tokens` at the embedder's limit.
    """

    def __init__(self, count_tokens: Callable[[str], int], max_tokens: int, overlap_tokens: int = 0):
        if max_tokens < 1:
            raise ConfigError(f"chunk max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= overlap_tokens < max_tokens:
            raise ConfigError(f"chunk overlap_tokens must be in 0..max_tokens-1 ({max_tokens - 1}), got "
                              f"{overlap_tokens}")
        self.count_tokens, self.max_tokens, self.overlap_tokens = count_tokens, int(max_tokens), int(overlap_tokens)
        self.overhead = count_tokens("")  # special tokens every text costs ([CLS] [SEP] = 2 for BERT)
        if self.overhead >= self.max_tokens:
            raise ConfigError(f"chunk max_tokens {max_tokens} leaves no room after the embedder's {self.overhead} "
                              f"special tokens")

    @classmethod
    def for_embedder(cls, embedder, max_tokens: int | None = None, overlap_tokens: int = 32) -> "Chunker":
        limit = int(embedder.max_tokens)
        if max_tokens is not None and max_tokens > limit:
            raise ConfigError(f"chunk size {max_tokens} tokens exceeds the embedder's limit of {limit} "
                              f"({embedder.name}); the rest of each chunk would be invisible to search")
        size = int(max_tokens or limit)
        return cls(embedder.count_tokens, size, min(overlap_tokens, size // 2))

    @property
    def settings(self) -> ChunkerSettings:
        return ChunkerSettings(self.max_tokens, self.overlap_tokens)

    # -- pieces ----------------------------------------------------------------------------------------------

    def _fits(self, text: str, start: int, end: int) -> bool:
        s, e = _trim(text, start, end)
        return self.count_tokens(text[s:e]) <= self.max_tokens

    def _split_long_word(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Longest prefixes that fit, found by binary search on the number of characters."""
        out = []
        while start < end:
            if self._fits(text, start, end):
                out.append((start, end))
                break
            lo, hi = start + 1, end  # text[start:lo] fits (one character always does: max_tokens > overhead)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._fits(text, start, mid):
                    lo = mid
                else:
                    hi = mid
            out.append((start, lo))
            start = lo
        return out

    def pieces(self, text: str) -> list[tuple[int, int, bool]]:
        """(start, end, starts_paragraph) spans covering `text`, each of which fits alone."""
        out: list[tuple[int, int, bool]] = []
        for ps, pe in _cuts(text, 0, len(text), _PARA):
            first = True
            for ss, se in _cuts(text, ps, pe, _SENT):
                if self._fits(text, ss, se):
                    spans = [(ss, se)]
                else:
                    spans = []
                    for ws, we in _cuts(text, ss, se, _SPACE):
                        spans += [(ws, we)] if self._fits(text, ws, we) else self._split_long_word(text, ws, we)
                for s, e in spans:
                    out.append((s, e, first))
                    first = False
        return out

    # -- packing ---------------------------------------------------------------------------------------------

    def split(self, text: str) -> list[tuple[int, int]]:
        """Character spans (start, end) of the chunks of `text`, whitespace trimmed; empty text -> []."""
        pieces = [p for p in self.pieces(text) if _trim(text, p[0], p[1])[0] < p[1]] if text.strip() else []
        if not pieces:
            return []
        cost = [max(0, self.count_tokens(text[slice(*_trim(text, s, e))]) - self.overhead) for s, e, _ in pieces]
        budget = self.max_tokens - self.overhead
        spans, i, n = [], 0, len(pieces)
        while i < n:
            j, est = i, cost[i]
            while j + 1 < n and est + cost[j + 1] <= budget:
                j += 1
                est += cost[j]
            while j > i and not self._fits(text, pieces[i][0], pieces[j][1]):  # the real count decides
                j -= 1
            if j + 1 < n and not pieces[j + 1][2]:  # prefer to end at a paragraph boundary if half full
                acc = 0
                best = None
                for b in range(i, j):
                    acc += cost[b]
                    if pieces[b + 1][2] and acc * 2 >= budget:
                        best = b
                if best is not None:
                    j = best
            spans.append(_trim(text, pieces[i][0], pieces[j][1]))
            if j + 1 >= n:
                break
            k, overlap = j + 1, 0
            while k - 1 > i and overlap + cost[k - 1] <= self.overlap_tokens:
                k -= 1
                overlap += cost[k]
            i = k
        return spans

    def chunk(self, doc: Document) -> list[Chunk]:
        out = []
        for index, (s, e) in enumerate(self.split(doc.text)):
            body = doc.text[s:e]
            out.append(Chunk(doc_id=doc.id, source=doc.source, index=index, start=s, end=e, text=body,
                             page=doc.page_at(s), n_tokens=self.count_tokens(body), meta=dict(doc.meta)))
        return out
