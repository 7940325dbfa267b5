"""Byte-level BPE: the tokenizer of GPT-2, GPT-4, Llama 3 and Qwen — trained, run, saved and loaded here.

What a tokenizer does
---------------------
A language model reads integers, not text. The tokenizer maps a string to a list of ids and back. Three designs:

* characters (one id per Unicode character): tiny vocabulary, but sequences are long and an unseen character
  has no id; see `lmforge.tokenizers.basic.CharTokenizer`.
* words (one id per word): short sequences, but the vocabulary explodes and every unseen word becomes `<|unk|>`;
  see `lmforge.tokenizers.basic.WordTokenizer`.
* **byte-level BPE** (this module): start from the 256 possible bytes, so *every* string is encodable and nothing
  is ever unknown, then learn merges of frequent adjacent pieces ("t" + "h" -> "th", "th" + "e" -> "the") until
  the vocabulary has the size you asked for. Frequent words become one token, rare ones a few.

Training (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"; GPT-2: Radford et
al. 2019, section 2.2)
----------------------------------------------------------------------------------------------------------------
1. Split the text on special tokens such as ``<|endoftext|>`` (they are never merged with anything), then
   *pre-tokenize* each piece with a regex: GPT-2's pattern cuts text into words with their leading space
   (``" hello"``), numbers, punctuation runs and whitespace, so merges never cross a word boundary ("dog." and
   "dog!" share the token " dog").
2. Count the pre-tokens. A corpus of millions of words has only tens of thousands of *distinct* pre-tokens, so the
   trainer works on ``{pre-token bytes: count}``, not on the text.
3. Count every adjacent pair of tokens inside the pre-tokens (weighted by the pre-token's count). Merge the most
   frequent pair into a new token; ties go to the lexicographically greater pair of byte strings. Record the merge.
4. Repeat until ``vocab_size`` is reached.

The naive loop recounts all pairs after every merge: O(merges x corpus). Here the counts are updated
*incrementally*: an index ``pair -> {pre-tokens containing it}`` tells us which words a merge touches, only
those are rewritten, and only their pair counts change. A max-heap with lazy deletion finds the best pair in
O(log n) instead of scanning every pair. Pre-tokenization of a big input runs in parallel worker processes.

Encoding
--------
For each pre-token, start from its bytes and repeatedly apply the merge with the lowest rank (the earliest
learned) among adjacent pairs, until no adjacent pair is a learned merge. `Tokenizer._bpe` is that loop in plain
Python (with a per-pre-token cache — natural text repeats words a lot). The fast path hands the same ranks to
OpenAI's `tiktoken` (Rust), which applies "merge the adjacent pair whose concatenation has the lowest rank".
The rules can differ, so the fast path is used only when every merged token is made by exactly one merge, ranks
grow with merge order and every token encodes to itself (`Tokenizer._ranks_consistent`); the tests check that the
two paths then agree, on GPT-2, trained tokenizers and random vocabularies.

Bytes on disk: GPT-2's byte-to-unicode table
--------------------------------------------
GPT-2's ``encoder.json``/``vocab.bpe`` and Hugging Face's ``tokenizer.json`` store tokens as *strings*, so each of
the 256 bytes is mapped to a printable character (``bytes_to_unicode``): printable ASCII maps to itself, the space
byte to ``"Ġ"``, newline to ``"Ċ"``. That is why GPT-2 vocabularies are full of ``Ġthe``.

Special tokens follow tiktoken's rules: ``encode`` raises if the text contains a special token that is
*disallowed* (by default: all of them), encodes it as one id if it is in ``allowed_special``, and as ordinary
text if it is in neither set (``disallowed_special=()``). ``encode`` never adds BOS/EOS by itself.

    >>> tok = Tokenizer.train(["low lower lowest " * 50], vocab_size=270)   # doctest: +SKIP
    >>> tok.decode(tok.encode("lowest lows"))                              # doctest: +SKIP
    'lowest lows'
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Collection, Iterable, Literal, Sequence

import regex

from lmforge.errors import DataError, TokenizerError
from lmforge.tokenizers.batch import BatchCallMixin
from lmforge.tokenizers.llama2c import Llama2cTokenizer

# ----------------------------------------------------------------------------------------------------------------
# Pre-tokenization patterns
# ----------------------------------------------------------------------------------------------------------------

#: GPT-2 (Radford et al. 2019): contractions, words with one leading space, numbers, punctuation, whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: The same split written with possessive quantifiers, which tiktoken's regex engine runs faster (tiktoken's
#: `r50k_pat_str`); used for the fast path only. The tests check both spellings give the same ids.
_GPT2_PATTERN_FAST = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
#: GPT-4 / cl100k_base: case-insensitive contractions, numbers in groups of at most 3 digits, newlines kept apart.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
#: Llama 3 (and Qwen 2 with a slightly different form) use a cl100k-like pattern.
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "cl100k": GPT4_PATTERN, "llama3": LLAMA3_PATTERN}

# Patterns for which a text may be cut after a letter that is followed by whitespace without changing the
# pre-tokens: no alternative of these patterns matches a letter followed by whitespace, and the only lookahead,
# `\s+(?!\S)`, never reaches back over a letter. This is what lets pre-tokenization run in parallel chunks.
_SPLITTABLE = {GPT2_PATTERN, GPT4_PATTERN, LLAMA3_PATTERN}
_SAFE_CUT = regex.compile(r"\p{L}(?=\s)")

ENDOFTEXT = "<|endoftext|>"


def resolve_pattern(pattern: str) -> str:
    """'gpt2' / 'gpt4' / 'cl100k' / 'llama3' -> the regex; any other string is taken as a regex itself."""
    p = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(p)
    except regex.error as e:
        raise TokenizerError(f"pre-tokenization pattern {pattern!r} is not a valid regex ({e})") from None
    return p


def pattern_name(pattern: str) -> str:
    for name, p in PATTERNS.items():
        if p == pattern:
            return name
    return "custom"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character.

    Bytes that are printable Latin-1 characters map to themselves; the other 68 (control bytes, space, ...) map to
    the characters 256, 257, ... in order. So b" " -> "Ġ" (U+0120) and b"\\n" -> "Ċ" (U+010A).

    >>> bytes_to_unicode()[ord(" ")], bytes_to_unicode()[ord("a")]
    ('Ġ', 'a')
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_unicode(token: bytes) -> str:
    """b' the' -> 'Ġthe' (GPT-2's on-disk spelling of a byte string)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def unicode_to_token(s: str) -> bytes:
    """'Ġthe' -> b' the'. Raises KeyError for a character outside the 256-character alphabet."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in s)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, turning every failure into a one-line `DataError`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _as_texts(texts_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Strings are text, `os.PathLike` objects (e.g. `pathlib.Path`) are files to read."""
    if isinstance(texts_or_paths, (str, os.PathLike)):
        texts_or_paths = [texts_or_paths]
    out = []
    for item in texts_or_paths:
        if isinstance(item, os.PathLike):
            out.append(read_text_file(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise DataError(f"expected text (str) or a file path (pathlib.Path), got {type(item).__name__}")
    return out


def _split_specials(text: str, specials: Collection[str]) -> list[str]:
    """Cut `text` at every special token and drop the specials: no merge may cross them."""
    if not specials:
        return [text]
    alternation = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return [p for p in regex.split(alternation, text) if p]


def _chunks(text: str, pattern: str, size: int) -> list[str]:
    """Cut a long text into pieces of about `size` characters at places where pre-tokenization cannot change."""
    if pattern not in _SPLITTABLE or len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


def _count_batch(args: tuple[list[str], str]) -> tuple[int, Counter]:
    """Worker: pre-token counts of a batch of pieces (and how many characters that was, for the progress bar)."""
    pieces, pattern = args
    compiled = regex.compile(pattern)
    counts: Counter = Counter()
    for p in pieces:
        counts.update(compiled.findall(p))
    return sum(len(p) for p in pieces), counts


def count_pretokens(texts: Sequence[str], pattern: str = GPT2_PATTERN, special_tokens: Collection[str] = (),
                    num_workers: int | None = None, progress: bool | None = None) -> Counter:
    """{pre-token bytes: count} over all texts (each text is its own document; specials are cut out).

    Inputs bigger than about 1 MB are pre-tokenized by `num_workers` processes (default: one per CPU), each on a
    chunk that ends at a safe cut (see `_SAFE_CUT`), so the counts equal the serial ones exactly.
    """
    from tqdm.auto import tqdm

    pieces: list[str] = []
    total = sum(len(t) for t in texts)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    chunk_size = max(1 << 18, total // max(1, 4 * workers) + 1)
    for t in texts:
        for part in _split_specials(t, special_tokens):
            pieces.extend(_chunks(part, pattern, chunk_size))
    counts: Counter = Counter()
    if workers > 1 and total > (1 << 20) and len(pieces) > 1:
        import multiprocessing as mp

        batches: list[list[str]] = [[]]  # many small documents travel together: one task per ~chunk_size chars
        size = 0
        for p in pieces:
            if size >= chunk_size:
                batches.append([])
                size = 0
            batches[-1].append(p)
            size += len(p)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(min(workers, len(batches))) as pool:
            bar = tqdm(total=total, unit="char", unit_scale=True, desc="pre-tokenize", disable=progress is False
                       if progress is not None else None)
            for n_chars, c in pool.imap_unordered(_count_batch, [(b, pattern) for b in batches]):
                counts.update(c)
                bar.update(n_chars)
            bar.close()
    else:
        compiled = regex.compile(pattern)
        bar = tqdm(total=total, unit="char", unit_scale=True, desc="pre-tokenize", disable=progress is False
                   if progress is not None else None)
        for p in pieces:
            counts.update(compiled.findall(p))
            bar.update(len(p))
        bar.close()
    return Counter({k.encode("utf-8"): v for k, v in counts.items()})


def _rev_key(b: bytes) -> tuple[int, ...]:
    """A key whose ascending order is the *descending* byte-string order (so heapq, a min-heap, pops the greatest).

    Each byte b becomes 255 - b, and a terminator 256 makes a prefix sort after its extensions.
    """
    return tuple(255 - x for x in b) + (256,)


def train_bpe(counts: dict[bytes, int], num_tokens: int, progress: bool | None = None
              ) -> list[tuple[bytes, bytes]]:
    """Learn merges from {pre-token bytes: count} until `num_tokens` new tokens exist. Returns the merges, in order.

    Fewer come back when no pair occurs any more (every pre-token became one token). A merge whose result
    already exists as a token (``"ab"+"c"`` after ``"a"+"bc"``) is recorded but creates no new token — the same
    rule as Hugging Face's trainer — so there can be more merges than new tokens.

    >>> train_bpe({b"hug": 10, b"pug": 5, b"hugs": 5}, 2, progress=False)
    [(b'u', b'g'), (b'h', b'ug')]
    """
    from tqdm.auto import tqdm

    # token ids: 0..255 are the bytes; new tokens get 256, 257, ...
    token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
    token_id: dict[bytes, int] = {b: i for i, b in enumerate(token_bytes)}
    rev: list[tuple[int, ...]] = [_rev_key(b) for b in token_bytes]

    words: list[list[int]] = [list(w) for w in counts]  # each pre-token as a list of token ids
    freqs: list[int] = list(counts.values())
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}  # pair -> indices of words that contain it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_counts[p] = pair_counts.get(p, 0) + f
            where.setdefault(p, set()).add(wi)

    # Max-heap of (-count, reversed bytes of left, reversed bytes of right, left, right). Entries go stale when a
    # count drops; a popped entry is trusted only if its count is still current, else it is re-pushed.
    heap = [(-c, rev[a], rev[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    bar = tqdm(total=num_tokens, unit="merge", desc="BPE merges", disable=progress is False if progress is not None
               else None)
    while len(token_bytes) - 256 < num_tokens and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        current = pair_counts.get((a, b), 0)
        if current != -neg:
            if current > 0:
                heapq.heappush(heap, (-current, rev[a], rev[b], a, b))
            continue
        new_bytes = token_bytes[a] + token_bytes[b]
        z = token_id.get(new_bytes)
        if z is None:
            z = len(token_bytes)
            token_bytes.append(new_bytes)
            token_id[new_bytes] = z
            rev.append(_rev_key(new_bytes))
        merges.append((token_bytes[a], token_bytes[b]))
        bar.update(1)

        # Rewrite only the words that contain (a, b), and change only the pairs around each occurrence:
        # "x a b y" -> "x z y" removes (x, a) and (b, y), adds (x, z) and (z, y). Consecutive occurrences
        # ("a b a b" -> "z z") work out because the left neighbour is read from the already-rewritten word.
        # The word index is allowed to go stale (a word listed under a pair it no longer has is skipped).
        touched: set[tuple[int, int]] = set()
        pc = pair_counts
        for wi in where.pop((a, b), ()):
            w = words[wi]
            n = len(w)
            try:
                i = w.index(a)
            except ValueError:
                continue
            f = freqs[wi]
            new: list[int] = []
            start = 0
            found = False
            while True:
                if i + 1 < n and w[i + 1] == b:
                    found = True
                    new.extend(w[start:i])
                    if new:
                        left = new[-1]
                        pc[(left, a)] -= f
                        p = (left, z)
                        pc[p] = pc.get(p, 0) + f
                        touched.add(p)
                        where.setdefault(p, set()).add(wi)
                    if i + 2 < n:
                        right = w[i + 2]
                        pc[(b, right)] -= f
                        p = (z, right)
                        pc[p] = pc.get(p, 0) + f
                        touched.add(p)
                        where.setdefault(p, set()).add(wi)
                    new.append(z)
                    start = i + 2
                    nxt = start
                else:
                    nxt = i + 1
                try:
                    i = w.index(a, nxt)
                except ValueError:
                    break
            if found:
                new.extend(w[start:])
                words[wi] = new
        pair_counts.pop((a, b), None)
        # only pairs that contain the new token can have *grown*; every other change was a decrease (lazy above)
        for p in touched:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, rev[p[0]], rev[p[1]], p[0], p[1]))
    bar.close()
    return merges


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _check_ids(vocab: dict[int, bytes], ids: Iterable[int]) -> list[int]:
    out = []
    for i in ids:
        try:
            j = int(i)  # plain ints, numpy ints, 0-d tensors
        except (TypeError, ValueError):
            raise TokenizerError(f"token id {i!r} is not an integer") from None
        if j not in vocab:
            # the size (largest id + 1) is computed only here: max() over a 50k vocabulary costs ~1 ms per call
            raise TokenizerError(f"token id {j} is not in the vocabulary (size {max(vocab, default=-1) + 1})")
        out.append(j)
    return out


def _join_bytes(vocab: dict[int, bytes], ids: Iterable[int]) -> bytes:
    if not isinstance(ids, list):
        ids = list(ids)
    try:
        return b"".join([vocab[i] for i in ids])
    except (KeyError, TypeError):  # rare: numpy/torch ints, or a bad id -> check one by one
        return b"".join([vocab[i] for i in _check_ids(vocab, ids)])


AllowedSpecial = Literal["all"] | Collection[str]


@lru_cache(maxsize=64)
def _alternation_cached(tokens: frozenset[str]) -> "regex.Pattern":
    return regex.compile("|".join(regex.escape(s) for s in sorted(tokens, key=lambda t: (-len(t), t))))

_CONSISTENT: dict[int, bool] = {}  # hash of (merges, vocab) -> result of Tokenizer._check_ranks


class Tokenizer(BatchCallMixin):
    """A byte-level BPE tokenizer (GPT-2 / GPT-4 / Llama 3 style).

    Build one with `Tokenizer.train`, `Tokenizer.from_gpt2_files` or `Tokenizer.load` (which also returns the other
    tokenizer kinds — `HFTokenizer`, `WordTokenizer`, `CharTokenizer` — for files that hold them).

    Attributes: `vocab` (id -> bytes, specials as their UTF-8), `merges` (ordered (bytes, bytes) pairs),
    `vocab_size` (largest id + 1), `special_tokens` (str -> id), `bos_token_id`/`eos_token_id`/`pad_token_id`
    (int or None), `add_bos_token` (the model expects BOS prepended; `encode` still never adds it),
    `chat_template` (a Jinja string or None), `pattern` (the pre-tokenization regex).
    """

    kind = "bpe"

    def __init__(self, vocab: dict[int, bytes], merges: Sequence[tuple[bytes, bytes]], pattern: str = GPT2_PATTERN,
                 special_tokens: dict[str, int] | None = None, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, add_bos_token: bool = False,
                 chat_template: str | None = None, added_tokens: dict[str, int] | None = None,
                 ignore_merges: bool = False, normalizer: str | None = None, use_fast: bool = True):
        self.pattern = resolve_pattern(pattern)
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        # Non-special added tokens (Hugging Face's `added_tokens` with special=false) are always matched in text.
        self.added_tokens: dict[str, int] = dict(added_tokens or {})
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self.ignore_merges = ignore_merges
        if normalizer not in (None, "NFC"):
            raise TokenizerError(f"unsupported normalizer {normalizer!r} for byte-level BPE (only NFC)")
        self.normalizer = normalizer
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)

        named = {**self.added_tokens, **self.special_tokens}
        named_ids = set(named.values())
        self._mergeable: dict[bytes, int] = {}  # ordinary tokens: bytes -> id
        for i, b in vocab.items():
            if i in named_ids:
                continue
            if b in self._mergeable:
                raise TokenizerError(f"vocabulary has the byte string {b!r} twice (ids {self._mergeable[b]} and {i})")
            self._mergeable[bytes(b)] = int(i)
        missing = [x for x in range(256) if bytes([x]) not in self._mergeable]
        if missing:
            raise TokenizerError(f"byte-level BPE needs all 256 single bytes in the vocabulary; byte 0x{missing[0]:02x}"
                                 f" is missing ({len(missing)} missing)")
        self._vocab: dict[int, bytes] = {i: b for b, i in self._mergeable.items()}
        for s, i in named.items():
            self._vocab[i] = s.encode("utf-8")
        self._byte_ids = [self._mergeable[bytes([x])] for x in range(256)]
        # pair of ids -> (rank, id of the merged token)
        self._merge_ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            try:
                pair = (self._mergeable[a], self._mergeable[b])
                z = self._mergeable[a + b]
            except KeyError:
                raise TokenizerError(f"merge {rank} ({a!r}, {b!r}) uses or makes a token that is not in the "
                                     "vocabulary") from None
            self._merge_ranks.setdefault(pair, (rank, z))
        self._cache: dict[bytes, list[int]] = {}
        self._re = regex.compile(self.pattern)
        self.bos_token_id = self._special_id(bos_token, "bos_token")
        self.eos_token_id = self._special_id(eos_token, "eos_token")
        self.pad_token_id = self._special_id(pad_token, "pad_token")
        self.use_fast = use_fast
        self._tt = None  # tiktoken.Encoding, built on first use
        self._tt_checked = False

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def train(cls, texts_or_paths: str | os.PathLike | Iterable[str | os.PathLike], vocab_size: int,
              special_tokens: Sequence[str] = (ENDOFTEXT,), pattern: str = "gpt2", *, num_workers: int | None = None,
              progress: bool | None = None, **kwargs: Any) -> "Tokenizer":
        """Learn a byte-level BPE from texts (`str`) and/or files (`pathlib.Path`).

        `vocab_size` counts everything: 256 bytes + merges + `special_tokens`. Ids: bytes 0-255 in byte order,
        then merged tokens in merge order, then the special tokens. `pattern`: "gpt2", "gpt4" (cl100k) or a regex.
        The first special token becomes BOS and EOS (GPT-2's convention for ``<|endoftext|>``) unless
        `bos_token`/`eos_token` are passed. A small corpus can run out of pairs to merge before `vocab_size` is
        reached; the vocabulary is then smaller than asked (check `tok.vocab_size`).
        """
        specials = list(dict.fromkeys(special_tokens))
        for s in specials:
            if not isinstance(s, str) or not s:
                raise TokenizerError(f"special token {s!r} must be a non-empty string")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise TokenizerError(f"vocab_size {vocab_size!r} is too small: byte-level BPE needs at least 256 + "
                                 f"{len(specials)} special token(s) = {256 + len(specials)}")
        pat = resolve_pattern(pattern)
        texts = _as_texts(texts_or_paths)
        counts = count_pretokens(texts, pat, specials, num_workers=num_workers, progress=progress)
        if not counts:
            raise DataError("empty corpus: nothing to train the tokenizer on")
        merges = train_bpe(counts, vocab_size - 256 - len(specials), progress=progress)
        vocab = {i: bytes([i]) for i in range(256)}
        known = set(vocab.values())
        for a, b in merges:
            if a + b not in known:
                known.add(a + b)
                vocab[len(vocab)] = a + b
        first = len(vocab)
        special_ids = {s: first + k for k, s in enumerate(specials)}
        default = specials[0] if specials else None
        kwargs.setdefault("bos_token", default)
        kwargs.setdefault("eos_token", default)
        return cls(vocab, merges, pat, special_ids, **kwargs)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> "Tokenizer":
        """GPT-2's tokenizer from OpenAI's `encoder.json` (token string -> id) and `vocab.bpe` (merges, in order)."""
        enc = _read_json_file(encoder_json)
        if not isinstance(enc, dict) or not enc:
            raise TokenizerError(f"{encoder_json}: expected a JSON object of token -> id")
        lines = read_text_file(vocab_bpe).split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        try:
            for line in lines:
                if not line.strip():
                    continue
                a, b = line.split(" ")
                merges.append((unicode_to_token(a), unicode_to_token(b)))
            specials = {s: int(i) for s, i in enc.items() if s == ENDOFTEXT}
            vocab = {int(i): unicode_to_token(s) for s, i in enc.items() if s not in specials}
        except (ValueError, KeyError) as e:
            raise TokenizerError(f"{vocab_bpe}: not a GPT-2 vocab.bpe / encoder.json pair ({e!r})") from None
        eot = ENDOFTEXT if specials else None
        return cls(vocab, merges, GPT2_PATTERN, specials, bos_token=eot, eos_token=eot)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer.json (or a directory holding one; its tokenizer_config.json and chat_template.jinja are
        read too). Byte-level BPE files give a `Tokenizer`; other Hugging Face models (SentencePiece-style
        Llama 2 / Mistral, WordPiece, ...) an `HFTokenizer`; lmforge's word/char tokenizers their own class."""
        return load_tokenizer(path)

    # ------------------------------------------------------------------------------------------------- basics
    @property
    def vocab(self) -> dict[int, bytes]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return max(self._vocab) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, pattern="
                f"{pattern_name(self.pattern)}, special_tokens={list(self.special_tokens)})")

    @property
    def bos_token(self) -> str | None:
        return self._name_of(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._name_of(self.eos_token_id)

    @property
    def pad_token(self) -> str | None:
        return self._name_of(self.pad_token_id)

    def _name_of(self, i: int | None) -> str | None:
        if i is None:
            return None
        for s, j in {**self.added_tokens, **self.special_tokens}.items():
            if j == i:
                return s
        return None

    def _special_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        named = {**self.added_tokens, **self.special_tokens}
        if token not in named:
            raise TokenizerError(f"{what} {token!r} is not one of the special tokens {sorted(named)}")
        return named[token]

    def token_to_id(self, token: str | bytes) -> int | None:
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            if token in self.added_tokens:
                return self.added_tokens[token]
            token = token.encode("utf-8")
        return self._mergeable.get(token)

    @staticmethod
    def _alternation(tokens: Iterable[str]) -> "regex.Pattern":
        """One regex matching any of `tokens`, longest first (so "<|endoftext|>" beats a shorter prefix)."""
        return _alternation_cached(frozenset(tokens))

    # ------------------------------------------------------------------------------------------------ encoding
    def _bpe(self, word: bytes) -> list[int]:
        """Encode one pre-token: start from its bytes, repeatedly merge the adjacent pair with the lowest rank.

        The readable reference path (minbpe-style). Example with merges [(u,g), (h,ug)]: b"hugs" ->
        [h, u, g, s] -> [h, ug, s] -> [hug, s].
        """
        if self.ignore_merges and word in self._mergeable:  # Llama 3: a whole pre-token in the vocab wins
            return [self._mergeable[word]]
        ids = [self._byte_ids[x] for x in word]
        ranks = self._merge_ranks
        while len(ids) >= 2:
            best = None
            for pair in zip(ids, ids[1:]):
                r = ranks.get(pair)
                if r is not None and (best is None or r[0] < best[0]):
                    best = (r[0], r[1], pair)
            if best is None:
                break
            _, z, (a, b) = best
            out, i, n = [], 0, len(ids)
            while i < n:
                if i < n - 1 and ids[i] == a and ids[i + 1] == b:
                    out.append(z)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def encode_piece(self, piece: bytes) -> list[int]:
        """The ids of one pre-token's bytes (`_bpe`, remembered: natural text repeats words a lot)."""
        ids = self._cache.get(piece)
        if ids is None:
            ids = self._bpe(piece)
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _encode_ordinary_py(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._re.findall(text):
            out.extend(self.encode_piece(piece.encode("utf-8")))
        return out

    def _fast(self):
        """The tiktoken.Encoding for these ranks, or None when the ranks cannot be expressed in tiktoken's rule."""
        if not self._tt_checked:
            self._tt_checked = True
            if self.use_fast and self._ranks_consistent():
                import tiktoken

                try:
                    self._tt = tiktoken.Encoding(
                        name="lmforge", pat_str=_GPT2_PATTERN_FAST if self.pattern == GPT2_PATTERN else self.pattern,
                        mergeable_ranks=self._mergeable,
                        special_tokens=dict(self.special_tokens))
                except Exception:  # tiktoken's regex engine rejects some patterns: keep the Python path
                    self._tt = None
        return self._tt

    def _ranks_consistent(self) -> bool:
        """True when tiktoken's "lowest-rank concatenation" rule reproduces our merge order exactly.

        Needed: every non-byte token is made by exactly one merge, ids grow with merge order (an id is the
        tiktoken rank), and every token encodes to itself under the merge rule (a token that merge-order BPE
        cannot reach, e.g. "abc" when the merges force "a"+"bc" but only "ab"+"c" is learned, would be
        reachable under tiktoken's rule). The last condition also makes Llama 3's `ignore_merges` a no-op: a
        pre-token that is a whole token already encodes to itself.
        """
        if len(self._merge_ranks) != len(self.merges) or len(self._mergeable) != 256 + len(self.merges):
            return False
        # remember the answer for identical vocabularies (loading GPT-2 again is common in one process)
        key = hash((tuple(self.merges), tuple(sorted(self._mergeable.items(), key=lambda kv: kv[1]))))
        if key in _CONSISTENT:
            return _CONSISTENT[key]
        _CONSISTENT[key] = ok = self._check_ranks()
        return ok

    def _ids_grow_with_merges(self) -> bool:
        last = max(self._byte_ids)
        for a, b in self.merges:
            z = self._mergeable[a + b]
            if z <= last:
                return False
            last = z
        return True

    def _check_ranks(self) -> bool:
        """Run merge-order BPE on every token's bytes: each must come back as itself (~1 s for GPT-2)."""
        if not self._ids_grow_with_merges():
            return False
        saved, self.ignore_merges = self.ignore_merges, False
        try:
            return all(len(tok) == 1 or self._bpe(tok) == [i] for tok, i in self._mergeable.items())
        finally:
            self.ignore_merges = saved

    @property
    def has_fast_path(self) -> bool:
        return self._fast() is not None

    def encode_ordinary(self, text: str, *, fast: bool | None = None) -> list[int]:
        """Encode text with no special-token handling at all (special-token text is plain text)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if self.normalizer == "NFC":  # Qwen 2: canonical composition first ("e" + U+0301 -> "é")
            text = unicodedata.normalize("NFC", text)
        if self.added_tokens:
            return self._encode_with_named(text, set(), fast)
        tt = self._fast() if fast is not False else None
        if tt is not None:
            return tt.encode_ordinary(text)
        return self._encode_ordinary_py(text)

    def _resolve_special(self, text: str, allowed_special: AllowedSpecial, disallowed_special: AllowedSpecial
                         ) -> set[str]:
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        else:
            disallowed = set(disallowed_special)
        # a substring test is much faster than a regex search over a long text; the regex names the culprit
        if disallowed and (len(disallowed) > 16 or any(s in text for s in disallowed)):
            m = self._alternation(disallowed).search(text)
            if m:
                raise TokenizerError(
                    f"text contains the special token {m.group()!r}, which is disallowed; pass allowed_special="
                    f"{{{m.group()!r}}} (or 'all') to encode it as a special token, or disallowed_special=() to "
                    "encode it as plain text")
        return allowed & set(self.special_tokens)

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset(),
               disallowed_special: AllowedSpecial = "all", fast: bool | None = None) -> list[int]:
        """Text -> ids, with tiktoken's special-token semantics (see the module docstring).

        `fast=False` forces the pure-Python path (the default uses tiktoken when possible).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        allowed = self._resolve_special(text, allowed_special, disallowed_special)
        if not allowed:
            return self.encode_ordinary(text, fast=fast)
        if self.normalizer == "NFC":
            text = unicodedata.normalize("NFC", text)
        if not self.added_tokens:
            tt = self._fast() if fast is not False else None
            if tt is not None:
                return tt.encode(text, allowed_special=allowed, disallowed_special=())
        return self._encode_with_named(text, allowed, fast)

    def _encode_with_named(self, text: str, allowed: set[str], fast: bool | None) -> list[int]:
        """Split at allowed specials and added tokens (each one id), encode the text between them."""
        named = {s: i for s, i in self.special_tokens.items() if s in allowed}
        named.update(self.added_tokens)
        if not named:
            return self._ordinary_chunk(text, fast)
        pat = self._alternation(named)
        out: list[int] = []
        start = 0
        for m in pat.finditer(text):
            if m.start() > start:
                out.extend(self._ordinary_chunk(text[start:m.start()], fast))
            out.append(named[m.group()])
            start = m.end()
        if start < len(text):
            out.extend(self._ordinary_chunk(text[start:], fast))
        return out

    def _ordinary_chunk(self, text: str, fast: bool | None) -> list[int]:
        tt = self._fast() if fast is not False else None
        return tt.encode_ordinary(text) if tt is not None else self._encode_ordinary_py(text)

    def encode_batch(self, texts: Sequence[str], *, allowed_special: AllowedSpecial = frozenset(),
                     disallowed_special: AllowedSpecial = "all", fast: bool | None = None) -> list[list[int]]:
        """Encode many texts; on the fast path tiktoken spreads them over threads."""
        tt = self._fast() if fast is not False else None
        if tt is None or self.added_tokens or self.normalizer or len(texts) < 2:
            return [self.encode(t, allowed_special=allowed_special, disallowed_special=disallowed_special,
                                fast=fast) for t in texts]
        allowed = set()
        for t in texts:  # the same checks (and error) as encode, before any work
            if not isinstance(t, str):
                raise TokenizerError(f"encode expects a str, got {type(t).__name__}")
            allowed = self._resolve_special(t, allowed_special, disallowed_special)
        return tt.encode_batch(list(texts), allowed_special=allowed, disallowed_special=())

    # ------------------------------------------------------------------------------------------------ decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the exact bytes (a token may hold part of a UTF-8 character; join bytes before decoding them)."""
        return _join_bytes(self._vocab, ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Bytes that do not form valid UTF-8 (ids that split a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> bytes:
        return self.decode_bytes([i])

    # --------------------------------------------------------------------------------------------- save / load
    def to_hf_dict(self) -> dict[str, Any]:
        """This tokenizer as a Hugging Face `tokenizer.json` object (loadable by `tokenizers.Tokenizer`).

        lmforge extras that tokenizer.json has no field for (BOS/EOS/PAD names, add_bos_token, chat template)
        live in ``model["lmforge"]``, a key `tokenizers` ignores; `save` on a directory also writes them to
        tokenizer_config.json, where `transformers.AutoTokenizer` looks for them.
        """
        named = {**self.added_tokens, **self.special_tokens}
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": s in self.special_tokens}
                 for s, i in sorted(named.items(), key=lambda kv: kv[1])]
        vocab = {token_to_unicode(b): i for b, i in sorted(self._mergeable.items(), key=lambda kv: kv[1])}
        for s, i in sorted(named.items(), key=lambda kv: kv[1]):
            vocab.setdefault(s, i)
        merges = [[token_to_unicode(a), token_to_unicode(b)] for a, b in self.merges]
        if self.pattern == GPT2_PATTERN:
            pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        else:
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        post: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                "use_regex": True}
        if self.add_bos_token and self.bos_token is not None:
            bos, bid = self.bos_token, self.bos_token_id
            post = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos: {"id": bos, "ids": [bid], "tokens": [bos]}}}
        extras = {"pattern_name": pattern_name(self.pattern), "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "add_bos_token": self.add_bos_token,
                  "chat_template": self.chat_template}
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if self.normalizer == "NFC" else None,
            "pre_tokenizer": pre, "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.ignore_merges, "vocab": vocab, "merges": merges, "lmforge": extras},
        }

    def tokenizer_config(self) -> dict[str, Any]:
        """The tokenizer_config.json that lets `transformers.AutoTokenizer` pick up specials and the template."""
        return _tokenizer_config(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Save atomically. A path ending in .json is the tokenizer.json itself; anything else is a directory that
        receives tokenizer.json and tokenizer_config.json. Returns the tokenizer.json path."""
        return _save_hf_style(self, self.to_hf_dict(), path)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json interop
# ----------------------------------------------------------------------------------------------------------------


def _read_json_file(path: str | os.PathLike) -> Any:
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _token_content(v: Any) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _tokenizer_config(tok: Any) -> dict[str, Any]:
    named = {**getattr(tok, "added_tokens", {}), **tok.special_tokens}
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "add_bos_token": tok.add_bos_token, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": s in tok.special_tokens}
                                 for s, i in sorted(named.items(), key=lambda kv: kv[1])},
    }
    unk = getattr(tok, "unk_token", None)
    if unk:
        cfg["unk_token"] = unk
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    return {k: v for k, v in cfg.items() if v is not None}


def _save_hf_style(tok: Any, data: dict[str, Any], path: str | os.PathLike) -> Path:
    from lmforge.utils import atomic_write_json  # (lmforge.utils imports torch: only when saving)

    path = Path(path)
    if path.suffix == ".json":
        atomic_write_json(path, data)
        return path
    if path.exists() and not path.is_dir():
        raise TokenizerError(f"{path}: exists and is not a directory (give a .json path to save a single file)")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "tokenizer.json", data)
    cfg_path = path / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.exists():  # keep keys another tool wrote (model_max_length, padding_side, ...)
        try:
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg = old if isinstance(old, dict) else {}
        except (OSError, ValueError):
            cfg = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        cfg.pop(k, None)
    cfg.update(_tokenizer_config(tok))
    atomic_write_json(cfg_path, cfg)
    return path / "tokenizer.json"


def _byte_level_pattern(pre: Any) -> str | None:
    """The regex of a byte-level pre-tokenizer we can reproduce exactly, or None."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("add_prefix_space") and not parts[1].get("use_regex", True)
                and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
                and isinstance(parts[0].get("pattern"), dict) and "Regex" in parts[0]["pattern"]):
            return parts[0]["pattern"]["Regex"]
    return None


def _post_bos(post: Any) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single sequence (Llama 3's BOS)."""
    if not isinstance(post, dict):
        return None
    if post.get("type") == "Sequence":
        for p in post.get("processors") or []:
            found = _post_bos(p)
            if found:
                return found
        return None
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def _is_byte_level_decoder(dec: Any) -> bool:
    if not isinstance(dec, dict):
        return False
    if dec.get("type") == "ByteLevel":
        return True
    if dec.get("type") == "Sequence":
        ds = dec.get("decoders") or []
        return len(ds) == 1 and _is_byte_level_decoder(ds[0])
    return False


# Tokenizer classes with a JSON format of their own, by their "type" field. Modules that define one register it here
# (lmforge.tokenizers.basic does, for its word and character tokenizers), so this loader reads them without
# importing them: the dependency points from the plug-in to the loader, never back.
TOKENIZER_KINDS: dict[str, type] = {}
# Readers of other file formats, tried first by `load_tokenizer`: reader(path) -> a tokenizer, or None if the path
# (a file, or a directory holding one) is not theirs. Modules register here, as for TOKENIZER_KINDS.
FILE_READERS: list = []


def tokenizer_from_hf_dict(data: dict[str, Any], config: dict[str, Any] | None = None,
                           chat_template: str | None = None, source: str = "tokenizer.json") -> Any:
    """Build the right tokenizer from a parsed tokenizer.json (and optional tokenizer_config.json)."""
    if not isinstance(data, dict):
        raise TokenizerError(f"{source}: expected a JSON object")
    kind = data.get("type")
    if kind in TOKENIZER_KINDS:  # lmforge's teaching tokenizers (lmforge.tokenizers.basic registers them)
        return TOKENIZER_KINDS[kind].from_dict(data)
    model = data.get("model")
    if not isinstance(model, dict) or "type" not in model:
        raise TokenizerError(f"{source}: not a tokenizer.json (no model.type)")
    config = config or {}
    extras = model.get("lmforge") if isinstance(model.get("lmforge"), dict) else {}
    normalizer = data.get("normalizer")
    norm_name = None
    if isinstance(normalizer, dict):
        norm_name = normalizer.get("type") if normalizer.get("type") == "NFC" else "other"
    pattern = _byte_level_pattern(data.get("pre_tokenizer"))
    byte_level = (model.get("type") == "BPE" and pattern is not None and _is_byte_level_decoder(data.get("decoder"))
                  and not model.get("byte_fallback") and not model.get("continuing_subword_prefix")
                  and not model.get("end_of_word_suffix") and not model.get("dropout") and norm_name != "other")
    specials: dict[str, int] = {}
    added: dict[str, int] = {}
    for t in data.get("added_tokens") or []:
        try:
            (specials if t.get("special") else added)[t["content"]] = int(t["id"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TokenizerError(f"{source}: malformed added_tokens entry {t!r}") from None
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            byte_level = False  # whitespace-eating added tokens (RoBERTa's <mask>): leave them to `tokenizers`
    names = {**added, **specials}

    def pick(key: str) -> str | None:
        v = _token_content(config.get(key))
        if v is None:
            v = extras.get(key)
        return v if v in names else None

    bos, eos, pad = pick("bos_token"), pick("eos_token"), pick("pad_token")
    post_bos = _post_bos(data.get("post_processor"))
    if bos is None and post_bos in names:
        bos = post_bos
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif "add_bos_token" in extras:
        add_bos = bool(extras["add_bos_token"])
    else:
        add_bos = post_bos is not None
    template = chat_template or config.get("chat_template") or extras.get("chat_template")
    if isinstance(template, list):  # older HF format: [{"name": "default", "template": "..."}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not byte_level:
        return HFTokenizer.from_hf_dict(data, bos_token=bos, eos_token=eos, pad_token=pad, add_bos_token=add_bos,
                                        chat_template=template, source=source)
    vocab_raw, merges_raw = model.get("vocab"), model.get("merges") or []
    if not isinstance(vocab_raw, dict) or not isinstance(merges_raw, list):
        raise TokenizerError(f"{source}: corrupt BPE model (model.vocab must be an object, model.merges a list)")
    wrapper = functools.partial(HFTokenizer.from_hf_dict, data, bos_token=bos, eos_token=eos, pad_token=pad,
                                add_bos_token=add_bos, chat_template=template, source=source)
    try:
        vocab = {int(i): unicode_to_token(s) for s, i in vocab_raw.items() if s not in names or names[s] != i}
        merges = []
        for m in merges_raw:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            merges.append((unicode_to_token(a), unicode_to_token(b)))
    except KeyError:  # a character outside GPT-2's byte alphabet: not the byte-level scheme we implement
        return wrapper()
    except (TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"{source}: corrupt BPE model ({type(e).__name__}: {e})") from None
    if len({b for b in vocab.values() if len(b) == 1}) < 256:
        # trained without the full byte alphabet: `tokenizers` silently drops unseen bytes; the wrapper does the same
        return wrapper()
    try:
        return Tokenizer(vocab, merges, pattern, specials, bos_token=bos, eos_token=eos, pad_token=pad,
                         add_bos_token=add_bos, chat_template=template, added_tokens=added,
                         ignore_merges=bool(model.get("ignore_merges")), normalizer=norm_name)
    except TokenizerError as e:
        raise TokenizerError(f"{source}: {e}") from None


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load any tokenizer lmforge knows: a tokenizer.json, a llama2.c tokenizer .bin, a `.tiktoken` rank file, or a
    directory holding one."""
    path = Path(path)
    for reader in FILE_READERS:  # formats defined in other modules (.tiktoken files: lmforge.tokenizers.tiktoken_file)
        tok = reader(path)
        if tok is not None:
            return tok
    config: dict[str, Any] = {}
    template = None
    llama2c = path / "tokenizer.bin" if path.is_dir() else path
    if llama2c.suffix == ".bin" and llama2c.is_file() and not (path.is_dir() and (path / "tokenizer.json").exists()):
        return Llama2cTokenizer.load(llama2c)
    if path.is_dir():
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = _read_json_file(cfg_path)
            config = cfg if isinstance(cfg, dict) else {}
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            template = read_text_file(jinja)
        file = path / "tokenizer.json"
        if not file.exists():
            raise TokenizerError(f"{path}: no tokenizer.json in this directory")
    else:
        file = path
    data = _read_json_file(file)
    return tokenizer_from_hf_dict(data, config, template, source=str(file))


# ----------------------------------------------------------------------------------------------------------------
# Any other Hugging Face tokenizer.json, through the `tokenizers` library
# ----------------------------------------------------------------------------------------------------------------


class HFTokenizer(BatchCallMixin):
    """A Hugging Face `tokenizers.Tokenizer` behind lmforge's tokenizer interface.

    Used for tokenizer.json files that are not byte-level BPE: SentencePiece-style BPE (Llama 2, Mistral: "▁" marks
    a space and unknown characters fall back to byte tokens ``<0x0A>``), WordPiece (BERT), Unigram. `vocab` maps
    ids to the bytes each token stands for, so streaming decoders can join bytes the same way for every kind.
    """

    kind = "hf"

    def __init__(self, hf: Any, data: dict[str, Any], *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, add_bos_token: bool = False, chat_template: str | None = None):
        from tokenizers import Tokenizer as HFTok

        self._hf = hf
        self._hf_plain = HFTok.from_str(hf.to_str())
        self._hf_plain.encode_special_tokens = True  # special-token text encodes as ordinary text
        self._data = data
        self.special_tokens: dict[str, int] = {}
        self.added_tokens: dict[str, int] = {}
        for t in data.get("added_tokens") or []:
            (self.special_tokens if t.get("special") else self.added_tokens)[t["content"]] = int(t["id"])
        self.merges: list[tuple[bytes, bytes]] = []
        self.pattern = None
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        named = {**self.added_tokens, **self.special_tokens}
        self.bos_token_id = named.get(bos_token) if bos_token else None
        self.eos_token_id = named.get(eos_token) if eos_token else None
        self.pad_token_id = named.get(pad_token) if pad_token else None
        model = data.get("model") or {}
        self.unk_token = model.get("unk_token")
        dec = json.dumps(data.get("decoder"))
        self._byte_level_decoder = '"ByteLevel"' in dec
        self._vocab = self._build_vocab()
        # SentencePiece decoders drop the space "▁" that the normalizer put before the first word
        self._strip_leading_space = '"Strip"' in dec or ('"Metaspace"' in dec and '"never"' not in dec)
        if model.get("type") == "BPE":
            for m in model.get("merges") or []:
                a, b = m.split(" ", 1) if isinstance(m, str) else m
                self.merges.append((self._piece_bytes(a), self._piece_bytes(b)))

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "tokenizer.json", **kwargs: Any) -> "HFTokenizer":
        from tokenizers import Tokenizer as HFTok

        try:
            hf = HFTok.from_str(json.dumps(data))
        except Exception as e:
            raise TokenizerError(f"{source}: the tokenizers library cannot load it ({str(e).splitlines()[0]})"
                                 ) from None
        return cls(hf, data, **kwargs)

    def _piece_bytes(self, piece: str) -> bytes:
        """The bytes a vocabulary entry stands for: "Ġthe" (byte-level) or "▁the" (SentencePiece) -> b" the",
        "<0x0A>" (byte fallback) -> b"\\n", "##ing" (WordPiece continuation) -> b"ing"."""
        if self._byte_level_decoder:
            try:
                return unicode_to_token(piece)
            except KeyError:
                pass
        m = regex.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m and (self._data.get("model") or {}).get("byte_fallback"):
            return bytes([int(m.group(1), 16)])
        if (self._data.get("model") or {}).get("type") == "WordPiece":
            prefix = (self._data.get("model") or {}).get("continuing_subword_prefix") or "##"
            return piece[len(prefix):].encode() if piece.startswith(prefix) else (" " + piece).encode()
        return piece.replace("▁", " ").encode("utf-8")

    def _build_vocab(self) -> dict[int, bytes]:
        vocab = {}
        named = {**self.added_tokens, **self.special_tokens}
        for s, i in self._hf.get_vocab(with_added_tokens=True).items():
            vocab[i] = s.encode("utf-8") if s in named else self._piece_bytes(s)
        return vocab

    @property
    def vocab(self) -> dict[int, bytes]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return max(self._vocab) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer(model={self._data['model'].get('type')}, vocab_size={self.vocab_size})"

    bos_token = property(lambda self: self._hf.id_to_token(self.bos_token_id) if self.bos_token_id is not None
                         else None)
    eos_token = property(lambda self: self._hf.id_to_token(self.eos_token_id) if self.eos_token_id is not None
                         else None)
    pad_token = property(lambda self: self._hf.id_to_token(self.pad_token_id) if self.pad_token_id is not None
                         else None)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset(),
               disallowed_special: AllowedSpecial = "all", fast: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        allowed = Tokenizer._resolve_special(self, text, allowed_special, disallowed_special)  # type: ignore[arg-type]
        present = {s for s in self.special_tokens if s in text}
        if not present:
            return self._hf.encode(text, add_special_tokens=False).ids
        if present <= allowed:
            return self._hf.encode(text, add_special_tokens=False).ids
        if not (present & allowed):
            return self._hf_plain.encode(text, add_special_tokens=False).ids
        # a mix: split at the allowed ones ourselves
        pat = Tokenizer._alternation(allowed & present)
        out, start = [], 0
        for m in pat.finditer(text):
            if m.start() > start:
                out.extend(self._hf_plain.encode(text[start:m.start()], add_special_tokens=False).ids)
            out.append(self.special_tokens[m.group()])
            start = m.end()
        if start < len(text):
            out.extend(self._hf_plain.encode(text[start:], add_special_tokens=False).ids)
        return out

    _alternation = staticmethod(Tokenizer._alternation)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._hf_plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], **kwargs: Any) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = _join_bytes(self._vocab, ids)
        if self._strip_leading_space and out.startswith(b" "):
            out = out[1:]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = _check_ids(self._vocab, ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> bytes:
        return self._vocab[i]

    def to_hf_dict(self) -> dict[str, Any]:
        return json.loads(self._hf.to_str())

    def tokenizer_config(self) -> dict[str, Any]:
        return _tokenizer_config(self)

    def save(self, path: str | os.PathLike) -> Path:
        return _save_hf_style(self, self.to_hf_dict(), path)


__all__ = [
    "Tokenizer", "HFTokenizer", "load_tokenizer", "train_bpe", "count_pretokens", "bytes_to_unicode",
    "GPT2_PATTERN", "GPT4_PATTERN", "LLAMA3_PATTERN", "PATTERNS", "ENDOFTEXT", "read_text_file",
]
