"""Data: from text to the batches a model trains on.

Four steps, each a small function or class here:

1. **Documents.** Text files, globs, JSONL files (one JSON object per line, the text in a field such as "text"),
   or the embedded default corpus (``"builtin"``). Large text files are read in pieces of about a megabyte, cut
   only after a newline that is followed by a non-space character: with GPT-2-style pre-tokenization such a cut
   never changes the tokens, so a 10 GB file streams through a fixed amount of memory.
2. **Token shards.** Each document is tokenized (in parallel worker processes) and followed by the EOS token, so
   the model learns where one text ends and the next begins. Tokens go to flat binary files (``shard_00000.bin``,
   ...) as uint16 when the vocabulary fits in 65,536 ids, else uint32, next to a ``manifest.json``. Reading them
   back is a ``numpy.memmap``: no copy in RAM, the OS pages in what a batch touches, so corpora larger than memory
   train as easily as small ones (nanoGPT's ``train.bin`` idea, split into shards).
3. **Split.** A deterministic train/validation split: the last ``val_fraction`` of the token stream is validation
   (as the course splits the-verdict.txt 90/10 by position).
4. **Batches.** Two ways to cut a token stream into training examples:
   - ``SlidingWindowDataset`` (the course's GPTDatasetV1): window ``i`` starts at ``i * stride``; the input is
     ``max_length`` tokens and the target is the same window shifted by one token (targets[t] = inputs[t + 1]).
     ``stride == max_length`` gives non-overlapping windows; a smaller stride overlaps them (more, correlated data).
   - ``PackedBatches``: each batch takes ``batch_size`` windows at random offsets of the whole stream (documents
     packed back to back, separated by EOS). This is how pretraining runs sample: every token can start a window,
     and an "epoch" has no special meaning. Batch ``k`` is drawn from an RNG seeded by ``(seed, k)``, so any batch
     can be recomputed from its index: that is what makes resume exact and multi-process sharding trivial.

The embedded corpus needs no download: it is text every Python install carries — the reference manual topics
shipped in ``pydoc_data.topics`` (the pages `help("if")` shows) and the docstrings of a fixed list of standard
library modules. It is English technical prose with code samples, about 0.5-1 MB: enough to train a small
tokenizer and a small language model on 2 CPU cores and watch it learn.
"""

from __future__ import annotations

import glob as globlib
import importlib
import inspect
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError
from lmforge.utils import atomic_dir, atomic_write_json

# A fixed, ordered list so the corpus is the same text on every machine with the same Python version.
_STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "sqlite3", "statistics", "string", "stringprep", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "urllib", "uuid", "warnings", "wave", "weakref", "xml",
    "zipfile", "zipimport", "zlib",
)


def _module_docs(name: str) -> list[str]:
    """Docstrings of a module and its public classes and functions (in source order), de-indented."""
    try:
        mod = importlib.import_module(name)
    except Exception:  # a module missing from a stripped-down Python build is simply skipped
        return []
    docs = []
    if mod.__doc__:
        docs.append(inspect.cleandoc(mod.__doc__))
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(doc)
    return docs


def builtin_documents() -> list[str]:
    """The embedded corpus as a list of documents (pydoc topics first, then stdlib docstrings)."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    with warnings.catch_warnings():  # touching deprecated aliases (typing.re, typing.io) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _STDLIB_MODULES:
            docs.extend(_module_docs(name))
    seen, unique = set(), []
    for d in docs:  # several names alias one object: keep the first copy
        if d and d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def builtin_corpus(separator: str = "\n\n") -> str:
    """The embedded default corpus as one string (documents joined by a blank line).

    >>> text = builtin_corpus()
    >>> len(text) > 400_000
    True
    """
    return separator.join(builtin_documents())


# ----------------------------------------------------------------------------------------------------------------
# 1. Documents
# ----------------------------------------------------------------------------------------------------------------
BUILTIN = "builtin"  # the name of the embedded corpus wherever a list of sources is accepted
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".json")


def _safe_cut(buf: str) -> int:
    """Index at which `buf` can be cut without changing GPT-2-style pre-tokens: just after a single newline between
    two non-space characters (searching from the end), else before a single space between non-spaces; 0 when there
    is no such place. (A run of whitespace must not be cut: "\\n\\n" at the end of a piece is one token, but two
    before a word.)

    >>> _safe_cut("one\\ntwo\\n\\nthree\\n four")
    4
    """
    i = buf.rfind("\n", 1, len(buf) - 1)
    while i > 0:
        if not buf[i - 1].isspace() and not buf[i + 1].isspace():
            return i + 1
        i = buf.rfind("\n", 1, i)
    i = buf.rfind(" ", 1, len(buf) - 1)
    while i > 0:
        if not buf[i - 1].isspace() and not buf[i + 1].isspace():
            return i
        i = buf.rfind(" ", 1, i)
    return 0


def _text_pieces(path: Path, chunk_chars: int) -> Iterator[str]:
    """A text file in pieces of about `chunk_chars` characters, cut only at safe places (see `_safe_cut`)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 byte-order mark is not text
            buf = ""
            while True:
                block = f.read(chunk_chars)
                if not block:
                    break
                buf += block
                cut = _safe_cut(buf) if len(buf) >= chunk_chars else 0
                if cut:
                    yield buf[:cut]
                    buf = buf[cut:]
            if buf:
                yield buf
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory") from None


def _json_texts(path: Path, text_field: str) -> Iterator[str]:
    """Texts of a JSONL file (one object per line) or a JSON file holding a list of objects or strings."""
    def text_of(obj, where: str) -> str:
        if isinstance(obj, str):
            return obj
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(f"{where}: no {text_field!r} field (set text_field to the key that holds the text)")
        if not isinstance(obj[text_field], str):
            raise DataError(f"{where}: field {text_field!r} is not a string")
        return obj[text_field]

    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records")
            for i, obj in enumerate(data):
                yield text_of(obj, f"{path} record {i}")
            return
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
                    yield text_of(obj, f"{path} line {n}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def source_list(data: str | Sequence[str]) -> list[str]:
    """A config's `data` as a list of sources: a string is one source, or several separated by commas, as the
    command line and YAML configs write them (`--data a.txt,b.txt`); a list is taken as it is."""
    if isinstance(data, (str, os.PathLike)):
        return [d for d in str(data).split(",") if d]
    return list(data)


def resolve_sources(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str | Path]:
    """Expand globs and directories into a sorted list of files; ``"builtin"`` stays as is."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataError("no data sources given")
    out: list[str | Path] = []
    for src in sources:
        s = str(src)
        if s == BUILTIN:
            out.append(BUILTIN)
        elif any(ch in s for ch in "*?["):
            matches = sorted(Path(m) for m in globlib.glob(os.path.expanduser(s), recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise DataError(f"{s}: the pattern matches no files")
            out.extend(files)
        else:
            p = Path(os.path.expanduser(s))
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
                if not files:
                    raise DataError(f"{p}: the directory holds no {'/'.join(_TEXT_SUFFIXES)} files")
                out.extend(files)
            elif p.is_file():
                out.append(p)
            else:
                raise DataError(f"{p}: file not found")
    return out


def read_documents(sources: str | os.PathLike | Sequence[str | os.PathLike], text_field: str = "text",
                   chunk_chars: int = 1 << 20) -> Iterator[tuple[str, bool]]:
    """Stream ``(text_piece, is_last_piece_of_its_document)`` from files, globs, JSONL and ``"builtin"``.

    A plain text file is one document (read in pieces); a JSONL/JSON file holds one document per record; the
    embedded corpus is its list of documents. Nothing is held in memory beyond one piece per file.
    """
    for src in resolve_sources(sources):
        if src == BUILTIN:
            for doc in builtin_documents():
                yield doc, True
        elif src.suffix in (".jsonl", ".json"):
            for text in _json_texts(src, text_field):
                yield text, True
        else:
            prev = None
            for piece in _text_pieces(src, chunk_chars):
                if prev is not None:
                    yield prev, False
                prev = piece
            if prev is not None:
                yield prev, True


def sources_size(sources) -> int | None:
    """Total bytes of the source files (for a progress bar), or None when unknown (the embedded corpus)."""
    total = 0
    for src in resolve_sources(sources):
        if src == BUILTIN:
            return None
        total += src.stat().st_size
    return total


# ----------------------------------------------------------------------------------------------------------------
# 2. Token shards
# ----------------------------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
SHARD_FORMAT = "lmforge-token-shards"

_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_piece(item: tuple[str, bool]) -> tuple[np.ndarray, bool]:
    text, last = item
    ids = _worker_tokenizer.encode(text, allowed_special=set(), disallowed_special=())  # specials in text = text
    return np.asarray(ids, dtype=np.int64), last


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (GPT-2's 50,257 does), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.dir, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.total = 0

    def add(self, ids: np.ndarray) -> None:
        self.buf.append(ids.astype(self.dtype))
        self.buffered += len(ids)
        self.total += len(ids)
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.buf)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens:]
            self.buf, self.buffered = ([rest] if len(rest) else []), len(rest)

    def _write(self, arr: np.ndarray) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        with open(self.dir / name, "wb") as f:
            arr.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({"file": name, "num_tokens": int(len(arr))})

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buf))
        self.buf, self.buffered = [], 0


def tokenize_to_shards(
    documents: Iterable[str] | Iterable[tuple[str, bool]],
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    eos_token_id: int | None = None,
    shard_tokens: int = 100_000_000,
    num_workers: int = 0,
    progress: bool = True,
    total_bytes: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> "TokenShards":
    """Tokenize documents into memory-mappable shards in `out_dir` (written atomically) and return them.

    documents:    strings (one document each) or ``(piece, is_last_piece)`` pairs from `read_documents`
    tokenizer:    anything with ``encode(text, allowed_special=..., disallowed_special=...)`` and ``vocab_size``
    eos_token_id: appended after each document; default the tokenizer's EOS
    num_workers:  worker processes for tokenization (0: in this process). The output does not depend on it.
    """
    from tqdm.auto import tqdm

    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents; pass eos_token_id")
    bos = getattr(tokenizer, "bos_token_id", None) if getattr(tokenizer, "add_bos_token", False) else None
    vocab_size = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab_size)
    items = ((d, True) if isinstance(d, str) else d for d in documents)
    n_docs = 0
    with atomic_dir(out_dir) as tmp:
        for old in list(tmp.glob("shard_*.bin")) + list(tmp.glob(MANIFEST)):
            old.unlink()
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
        pool = None
        if num_workers > 0:
            import multiprocessing as mp

            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
            pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,))
        else:
            _init_worker(tokenizer)
        try:
            start_of_doc = True
            window = max(1, num_workers) * 8  # pieces in flight: bounded memory however large the corpus
            while True:
                chunk = list(itertools.islice(items, window))
                if not chunk:
                    break
                results = pool.map(_encode_piece, chunk) if pool else [_encode_piece(c) for c in chunk]
                for (text, _), (ids, last) in zip(chunk, results):
                    if start_of_doc and bos is not None:
                        writer.add(np.asarray([bos]))
                    writer.add(ids)
                    start_of_doc = last
                    if last:
                        writer.add(np.asarray([eos]))
                        n_docs += 1
                    bar.update(len(text.encode("utf-8")) if total_bytes else len(text))
                bar.set_postfix(tokens=f"{writer.total:,}", refresh=False)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
        writer.close()
        if writer.total == 0 or n_docs == 0 or writer.total == n_docs:
            raise DataError("no text to tokenize: the data is empty")
        max_id = max(int(np.fromfile(tmp / s["file"], dtype=dtype).max()) for s in writer.shards)
        if max_id >= vocab_size:
            raise DataError(f"token id {max_id} is outside the tokenizer's vocab_size {vocab_size}")
        atomic_write_json(tmp / MANIFEST, {
            "format": SHARD_FORMAT, "version": 1, "dtype": dtype.name, "vocab_size": vocab_size,
            "eos_token_id": int(eos), "bos_token_id": bos, "num_tokens": writer.total, "num_documents": n_docs,
            "shards": writer.shards, **(metadata or {}),
        })
    return TokenShards(out_dir)


class TokenView:
    """Tokens ``[start, stop)`` of a token stream, sliceable like an array: ``view[a:b] -> np.ndarray (int64)``."""

    def __init__(self, base, start: int = 0, stop: int | None = None):
        self.base = base
        self.start = start
        self.stop = len(base) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise DataError("token views support contiguous slices only")
            return _slice(self.base, self.start + a, self.start + max(a, b))
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError(key)
        return int(_slice(self.base, self.start + key, self.start + key + 1)[0])

    def numpy(self) -> np.ndarray:
        return self[0:len(self)]


def _slice(base, a: int, b: int) -> np.ndarray:
    if isinstance(base, TokenShards):
        return base.slice(a, b)
    return np.asarray(base[a:b], dtype=np.int64)


class TokenShards:
    """A directory written by `tokenize_to_shards`, memory-mapped: ``len(shards)``, ``shards.slice(a, b)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise DataError(f"{self.path}: not a token-shard directory (no {MANIFEST})")
        try:
            self.manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mpath}: unreadable manifest ({e})") from None
        if self.manifest.get("format") != SHARD_FORMAT:
            raise DataError(f"{mpath}: not an lmforge token-shard manifest")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.maps = []
        for s in self.manifest["shards"]:
            f = self.path / s["file"]
            if not f.exists() or f.stat().st_size != s["num_tokens"] * self.dtype.itemsize:
                raise DataError(f"{f}: missing or truncated shard (expected {s['num_tokens']} tokens)")
            self.maps.append(np.memmap(f, dtype=self.dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])  # shard i holds [offsets[i], offsets[i+1])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.manifest["eos_token_id"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) as int64, read across shard boundaries."""
        a, b = max(0, a), min(b, len(self))
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, a, side="right")) - 1
        parts = []
        while a < b:
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            take = min(b, hi)
            parts.append(np.asarray(self.maps[i][a - lo: take - lo], dtype=np.int64))
            a, i = take, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, key):
        return TokenView(self)[key]

    def numpy(self) -> np.ndarray:
        return self.slice(0, len(self))


# ----------------------------------------------------------------------------------------------------------------
# 3. Deterministic split
# ----------------------------------------------------------------------------------------------------------------
def train_val_split(tokens, val_fraction: float = 0.1) -> tuple[TokenView, TokenView]:
    """(train, validation) views: the first ``1 - val_fraction`` of the stream, then the rest.

    >>> tr, va = train_val_split(np.arange(100), 0.1)
    >>> len(tr), len(va), int(va[0])
    (90, 10, 90)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(tokens)
    cut = int(round(n * (1.0 - val_fraction)))
    return TokenView(tokens, 0, cut), TokenView(tokens, cut, n)


# ----------------------------------------------------------------------------------------------------------------
# 4. Datasets and batches
# ----------------------------------------------------------------------------------------------------------------
class SlidingWindowDataset:
    """The course's GPTDatasetV1: windows of `max_length` tokens every `stride` tokens, targets shifted by one.

    >>> ds = SlidingWindowDataset(list(range(10)), max_length=4, stride=4)
    >>> len(ds), ds[1][0].tolist(), ds[1][1].tolist()
    (2, [4, 5, 6, 7], [5, 6, 7, 8])
    """

    def __init__(self, tokens, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise DataError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        self.tokens = tokens
        self.max_length, self.stride = max_length, stride
        n = len(tokens)
        self.starts = range(0, n - max_length, stride)  # as the course: the last window needs one more target
        if len(self.starts) == 0:
            raise DataError(f"{n} tokens are too few for one window of max_length={max_length} (+1 target)")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        import torch

        s = self.starts[i]
        chunk = torch.from_numpy(np.asarray(_slice(self.tokens, s, s + self.max_length + 1), dtype=np.int64))
        return chunk[:-1], chunk[1:]  # (T,), (T,)


def collate_pairs(items: list) -> dict[str, Any]:
    """[(input, target), ...] of equal lengths -> {"input_ids": (B, T), "labels": (B, T)}; dicts are stacked."""
    import torch

    if isinstance(items[0], dict):
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    xs, ys = zip(*items)
    return {"input_ids": torch.stack(list(xs)), "labels": torch.stack(list(ys))}


class Batches:
    """A map-style dataset served as batches addressed by a global index (what `lmforge.training.loop` consumes).

    ``batches(k)`` is batch ``k % len(batches)`` of epoch ``k // len(batches)``; with ``shuffle`` each epoch has
    its own permutation drawn from ``(seed, epoch)``, so batch ``k`` is the same in every run and after a resume.
    ``batches[j]`` / ``len(batches)`` / iteration give epoch 0 in order (a validation set).
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 collate: Callable[[list], Any] = collate_pairs):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.shuffle, self.seed, self.collate = dataset, batch_size, shuffle, seed, collate
        n = len(dataset)
        self.n_batches = n // batch_size if drop_last else -(-n // batch_size)
        if self.n_batches == 0:
            raise DataError(f"{n} examples make no batch of {batch_size}" + (" (drop_last)" if drop_last else ""))

    def __len__(self) -> int:
        return self.n_batches

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __call__(self, index: int):
        epoch, j = divmod(index, self.n_batches)
        order = self._order(epoch)
        return self.collate([self.dataset[int(k)] for k in order[j * self.batch_size:(j + 1) * self.batch_size]])

    def __getitem__(self, j: int):
        if not 0 <= j < self.n_batches:
            raise IndexError(j)
        return self(j)

    def __iter__(self):
        return (self(j) for j in range(self.n_batches))


class PackedBatches:
    """Random-offset packed sampling: batch ``k`` holds `batch_size` windows of `block_size` (+1) tokens starting
    at offsets drawn from an RNG seeded by ``(seed, k)``. Works on memory-mapped shards of any size."""

    def __init__(self, tokens, batch_size: int, block_size: int, seed: int = 0):
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens are too few for one window of block_size={block_size} (+1 target)")
        self.tokens, self.batch_size, self.block_size, self.seed = tokens, batch_size, block_size, seed

    def __call__(self, index: int) -> dict[str, Any]:
        import torch

        rng = np.random.default_rng([self.seed, index])
        offsets = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        rows = np.stack([_slice(self.tokens, int(o), int(o) + self.block_size + 1) for o in offsets])
        rows = torch.from_numpy(rows)  # (B, T+1)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}  # (B, T), (B, T)

