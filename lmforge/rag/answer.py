"""Grounded answers: retrieved chunks -> numbered sources in the prompt -> an answer that cites them as [n].

A model asked a question with no sources answers from memory, and when memory is missing it still produces fluent
text: a hallucination. Grounding narrows that gap in three checked steps:

1. **Numbered sources.** The prompt lists the retrieved chunks as [1], [2], ... with where each came from, and
   instructs the model to answer only from them, to cite each claim as [n], and to say it does not know otherwise.
2. **Citation check.** Every [n] in the answer must name a source that was actually given. A citation that maps to
   none ([7] when five sources were shown) is removed from the text and reported in `Answer.dropped`; the rest map
   to their chunks (`Answer.citations`), so a user can open the exact passage (source, offsets, page).
3. **Refusal.** When retrieval finds nothing whose score reaches `min_score`, the generator is not called at all and
   the answer says so. Inventing an answer from nothing is exactly what RAG is meant to prevent. A model reply that
   itself says it cannot answer is also marked `refused`.

Generators: `LmforgeGenerator` (any `lmforge.load(dir)` model, through `lm.chat` when it has a chat template,
`lm.generate` otherwise) and `OpenAIGenerator` (any OpenAI-compatible `/v1/chat/completions` endpoint, including
`lmforge serve`). A `Reader` (extractive question answering: pick the answer span inside a passage) can replace
the generator; its answer is then a quote from one source, cited like any other. `QAReader` is one, on any
lmforge encoder with a question-answering head (a SQuAD 2.0 head also says "no answer", which counts as a refusal).

`summarize` does long-document summarization by map-reduce: summarize every chunk (map), then summarize groups of
summaries that fit the model's budget (reduce), until one summary is left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from lmforge.errors import ConfigError, DataError, NetworkError
from lmforge.rag.retrievers import Retriever
from lmforge.rag.store import Hit

NOT_FOUND = "I could not find an answer to this in the indexed documents."
SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources below. Cite every source you use as [n], "
    "for example [1] or [2][3]. If the sources do not contain the answer, reply exactly: "
    "\"I don't know based on the provided sources.\"")
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_REFUSAL = re.compile(r"\b(i don'?t know|i do not know|cannot answer|can'?t answer|not (?:contained|mentioned|found)"
                      r" in the (?:provided )?(?:sources|documents|context))\b", re.IGNORECASE)


class Generator(Protocol):
    def complete(self, messages: list[dict]) -> str: ...


class Reader(Protocol):
    """Extractive QA: the best answer span of `context` for `question`, with a score; ('', score) for no answer."""

    def answer(self, question: str, context: str) -> tuple[str, float]: ...


@dataclass
class Answer:
    question: str
    text: str
    hits: list[Hit]
    citations: dict[int, Hit] = field(default_factory=dict)  # n -> the chunk [n] refers to
    dropped: list[int] = field(default_factory=list)  # cited numbers that map to no source, removed from `text`
    refused: bool = False

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "refused": self.refused, "dropped": self.dropped,
                "citations": {str(n): h.to_dict() for n, h in self.citations.items()},
                "sources": [dict(h.to_dict(), n=i) for i, h in enumerate(self.hits, 1)]}


def format_sources(hits: Sequence[Hit], max_chars: int | None = None) -> str:
    """'[1] (a.md, chars 0-120)\\n<text>\\n\\n[2] ...' with page numbers when known."""
    parts = []
    for n, h in enumerate(hits, 1):
        c = h.chunk
        where = f"{c.source}, page {c.page}" if c.page is not None else f"{c.source}, chars {c.start}-{c.end}"
        text = c.text if max_chars is None else c.text[:max_chars]
        parts.append(f"[{n}] ({where})\n{text}")
    return "\n\n".join(parts)


def build_messages(question: str, hits: Sequence[Hit]) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Sources:\n\n{format_sources(hits)}\n\nQuestion: {question}\nAnswer:"}]


def check_citations(text: str, hits: Sequence[Hit]) -> tuple[str, dict[int, Hit], list[int]]:
    """Map [n] to hits[n-1]; drop the numbers that map to none. ('X [1][9].', 2 hits) -> ('X [1].', {1: ..}, [9])."""
    citations: dict[int, Hit] = {}
    dropped: list[int] = []

    def fix(m: re.Match) -> str:
        keep = []
        for s in m.group(1).split(","):
            n = int(s)
            if 1 <= n <= len(hits):
                citations[n] = hits[n - 1]
                keep.append(str(n))
            elif n not in dropped:
                dropped.append(n)
        return f"[{', '.join(keep)}]" if keep else ""

    cleaned = _CITATION.sub(fix, text)
    cleaned = re.sub(r"[ \t]+([.,;:!?])", r"\1", cleaned) if dropped else cleaned
    return cleaned.strip(), dict(sorted(citations.items())), dropped


class Answerer:
    """Retrieve, then answer from the retrieved chunks with a generator (or an extractive reader).

    `min_score`: if the best hit scores below it (or nothing is found), answer NOT_FOUND without generating.
    Its scale is the retriever's: cosine for dense, BM25 points for lexical, sums of w/(k_rrf+rank) for hybrid
    (HybridRetriever.default: at most 0.2/31 + 1/31 = 0.039).
    """

    def __init__(self, retriever: Retriever, generator: Generator | None = None, reader: Reader | None = None,
                 k: int = 5, min_score: float | None = None, reader_min_score: float | None = None):
        if (generator is None) == (reader is None):
            raise ConfigError("Answerer needs exactly one of generator= or reader=")
        self.retriever, self.generator, self.reader = retriever, generator, reader
        self.k, self.min_score, self.reader_min_score = int(k), min_score, reader_min_score

    def ask(self, question: str, filter: dict | None = None) -> Answer:
        if not question.strip():
            raise DataError("the question is empty")
        hits = self.retriever.retrieve(question, k=self.k, filter=filter)
        if not hits or (self.min_score is not None and hits[0].score < self.min_score):
            return Answer(question, NOT_FOUND, hits, refused=True)
        if self.reader is not None:
            return self._read(question, hits)
        raw = self.generator.complete(build_messages(question, hits))
        text, citations, dropped = check_citations(raw, hits)
        refused = bool(_REFUSAL.search(text)) and not citations
        return Answer(question, text or NOT_FOUND, hits, citations, dropped, refused=refused or not text)

    def _read(self, question: str, hits: list[Hit]) -> Answer:
        best: tuple[float, int, str] | None = None
        for n, h in enumerate(hits, 1):
            span, score = self.reader.answer(question, h.chunk.text)
            if span and (best is None or score > best[0]):
                best = (score, n, span)
        if best is None or (self.reader_min_score is not None and best[0] < self.reader_min_score):
            return Answer(question, NOT_FOUND, hits, refused=True)
        score, n, span = best
        return Answer(question, f"{span} [{n}]", hits, {n: hits[n - 1]}, [])


# ---------------------------------------------------------------------------------------------------------------

def _text_of(result) -> str:
    """lm.generate/chat may return a string, a list of one string, or a dict with 'text'/'content'."""
    if isinstance(result, list):
        result = result[0] if result else ""
    if isinstance(result, dict):
        result = result.get("text") or result.get("content") or (result.get("message") or {}).get("content", "")
    return str(result)


class LmforgeGenerator:
    """Any lmforge model: `lm.chat(messages)` when the model has a chat template, else `lm.generate(prompt)`."""

    def __init__(self, lm, max_new_tokens: int = 200, temperature: float = 0.0, **controls):
        if isinstance(lm, str):
            import lmforge

            lm = lmforge.load(lm)
        self.lm = lm
        self.controls = dict(max_new_tokens=max_new_tokens, temperature=temperature, **controls)

    def complete(self, messages: list[dict]) -> str:
        if getattr(self.lm, "chat_template", None):
            return _text_of(self.lm.chat(messages, **self.controls)).strip()
        prompt = "\n\n".join(m["content"] for m in messages) + " "
        return _text_of(self.lm.generate(prompt, **self.controls)).strip()


class OpenAIGenerator:
    """`POST {base_url}/chat/completions` on any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, lmforge serve)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 300,
                 temperature: float = 0.0, timeout: float = 120.0):
        from lmforge.rag.embedders import _httpx

        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self._httpx = _httpx()
        self._client = self._httpx.Client(timeout=timeout,
                                          headers={"Authorization": f"Bearer {api_key}"} if api_key else {})

    def complete(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        try:
            r = self._client.post(self.url, json=body)
        except self._httpx.HTTPError as e:
            raise NetworkError(f"chat endpoint {self.url} unreachable: {e}") from None
        if r.status_code != 200:
            raise NetworkError(f"chat endpoint {self.url} answered {r.status_code}: {r.text[:200]}")
        try:
            return str(r.json()["choices"][0]["message"]["content"] or "").strip()
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError(f"chat endpoint {self.url} returned no choices[0].message.content") from None


class QAReader:
    """Extractive QA with an lmforge encoder that has a question-answering head (`lmforge finetune qa` makes one):
    `lmforge.tasks.question_answering` reads "[CLS] question [SEP] passage [SEP]" in windows and returns the best
    span, or "" when the model's no-answer score ([CLS], SQuAD 2.0) beats every span.

    `answer` returns (span, score); the score is p_start * p_end of the span, comparable across passages.
    """

    def __init__(self, model, max_seq_len: int = 384, doc_stride: int = 128, max_answer_len: int = 30,
                 handle_impossible_answer: bool = True):
        from lmforge.tasks.common import load_encoder, task_model

        self.lm = load_encoder(model, task="question answering") if isinstance(model, str) else model
        self.model = task_model(self.lm, "question_answering")  # a one-line error when there is no QA head
        self.options = dict(max_seq_len=max_seq_len, doc_stride=doc_stride, max_answer_len=max_answer_len,
                            handle_impossible_answer=handle_impossible_answer)

    def answer(self, question: str, context: str) -> tuple[str, float]:
        from lmforge.tasks.question_answering import question_answering

        r = question_answering(self.lm, question, context, model=self.model, **self.options)
        return r["answer"].strip(), float(r["score"])


def make_generator(spec: str, api_key: str | None = None, max_new_tokens: int = 200) -> Generator:
    """'http(s)://host/v1#model' -> OpenAIGenerator; anything else is a model for lmforge.load."""
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return OpenAIGenerator(url, model or "default", api_key=api_key, max_tokens=max_new_tokens)
    return LmforgeGenerator(spec, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------------------------

MAP_PROMPT = "Summarize the following passage in a few sentences, keeping names, numbers and dates.\n\n{text}"
REDUCE_PROMPT = ("Combine these partial summaries of one document into a single coherent summary, keeping names, "
                 "numbers and dates.\n\n{text}")


def summarize(chunks: Sequence[str], generator: Generator, count_tokens: Callable[[str], int],
              max_input_tokens: int = 1024, progress: Callable[[str], None] | None = None) -> str:
    """Map-reduce summary of a long document's chunks.

    map: one summary per chunk. reduce: pack summaries into groups of at most `max_input_tokens` (by
    `count_tokens`), summarize each group, and repeat until one summary remains.
    """
    if not chunks:
        raise DataError("nothing to summarize (no chunks)")

    def ask(template: str, text: str) -> str:
        return generator.complete([{"role": "user", "content": template.format(text=text)}]).strip()

    level = []
    for i, c in enumerate(chunks, 1):
        level.append(ask(MAP_PROMPT, c))
        if progress:
            progress(f"map: summarized chunk {i}/{len(chunks)}")
    rounds = 0
    while len(level) > 1:
        groups, cur, used = [], [], 0
        for s in level:
            n = count_tokens(s)
            if cur and used + n > max_input_tokens:
                groups.append(cur)
                cur, used = [], 0
            cur.append(s)
            used += n
        groups.append(cur)
        if len(groups) == len(level):  # no group merged anything: summaries are too long to combine
            groups = [level[i:i + 2] for i in range(0, len(level), 2)]
        level = [ask(REDUCE_PROMPT, "\n\n".join(g)) if len(g) > 1 else g[0] for g in groups]
        rounds += 1
        if progress:
            progress(f"reduce round {rounds}: {len(level)} summaries")
    return level[0]
