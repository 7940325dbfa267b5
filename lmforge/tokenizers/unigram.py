"""Unigram (SentencePiece) tokenization from a Hugging Face `tokenizer.json`, with ids equal to HF's (T5, mT5,
ALBERT, XLNet, and any file the `tokenizers` library's Unigram trainer writes).

BPE builds a word from merges; WordPiece takes the longest piece first. The Unigram model (Kudo 2018) instead gives
every piece a log-probability (its "score") and cuts a word into the pieces whose scores sum highest:

    "▁unhappy"  ->  max over all cuts of  sum(score(piece))        e.g. ▁un + happy  (-7.1 + -6.3 = -13.4)
                                                                   beats ▁unh + appy (-11.8 + -9.9 = -21.7)

The best cut is found by dynamic programming (the Viterbi algorithm): walk the word left to right; best[j] is the
best score of any cut of the first j characters; for each start i and each vocabulary piece w that begins there,
best[i + len(w)] = max(best[i + len(w)], best[i] + score(w)); then follow the winning pieces back from the end.
A character no piece covers becomes <unk> with score (lowest score - 10), and runs of them fuse into one <unk>
(or, when the file says `byte_fallback`, into the byte pieces <0x41> of its UTF-8 bytes).

Encoding a text is the four stages a tokenizer.json names, as in `lmforge.tokenizers.wordpiece`:

    0. special tokens        "</s>", "<extra_id_0>" written in the text are cut out first and kept whole
    1. normalize             T5's file: SentencePiece's NFKC table (`Precompiled`, see below), runs of spaces -> one
    2. pre-tokenize          Metaspace: " " -> "▁", a "▁" prepended, split before each "▁": "▁Hello", "▁world"
                             (+ Digits, in some files: each digit its own pre-token, "▁2021" -> "▁", "2", "0", ...)
    3. model (Unigram)       Viterbi over the piece scores, per pre-token
    4. post-process          Template: T5 appends "</s>"

Decoding turns "▁" back into spaces (dropping it at the very start) and byte pieces back into bytes.

`Precompiled` is SentencePiece's normalization table compiled into the file (`precompiled_charsmap`, base64): the
rules of `nmt_nfkc` (NFKC, odd spaces -> " ", control characters dropped) or of any custom rule set, as a list of
(UTF-8 key -> replacement) rewrites. Its bytes are

    u32 n (little-endian) | n bytes: a double-array trie over the keys' bytes | replacements, each ending in \0

The trie (darts-clone's layout) is an array of u32 units; from node p, byte c leads to p' = p ^ offset(unit[p]) ^ c,
valid when label(unit[p']) == c; a key ends where a unit has its leaf bit, and the leaf unit's value is the offset of
the replacement in the string part. `PrecompiledCharsmap` reads the array and walks it. SentencePiece applies it by
longest match (at each position the longest key that starts there, else the character as is); Hugging Face's
`tokenizers` (whose ids lmforge matches) applies it per grapheme cluster: a cluster shorter than 6 bytes is replaced
whole by the value of the *shortest* key it starts with, otherwise each character is looked up on its own. The two
agree except on rare clusters (a combining mark after a rewritten character); both are here and tested against
`tokenizers` and against `sentencepiece` itself (`tests/test_unigram.py`).

    tok = UnigramTokenizer.load("t5-dir/")         # reads tokenizer.json
    tok.encode("Translate English to German: hi")  # [ ... , 1]   (1 = </s>)
    tok.decode(ids)                                 # "Translate English to German: hi"
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import unicodedata
from array import array
from pathlib import Path
from typing import Any, Iterable, Sequence

import regex

from lmforge.errors import TokenizerError
from lmforge.utils import atomic_write, atomic_write_json

UNK_PENALTY = 10.0  # an unknown character scores 10 below the worst piece (SentencePiece's kUnkPenalty)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# ----------------------------------------------------------------------------------------------------------------
# Normalizers: str -> str (pure functions built from the file's JSON)
# ----------------------------------------------------------------------------------------------------------------
def nmt_normalize(text: str) -> str:
    """SentencePiece's NMT rules: drop control characters, turn odd whitespace (tab, newline, zero-width space,
    BOM, ...) into a plain space. "a\\tb\\x01c" -> "a bc"."""
    out = []
    for c in text:
        cp = ord(c)
        if 0x01 <= cp <= 0x08 or cp == 0x0B or 0x0E <= cp <= 0x1F or cp in (0x7F, 0x8F, 0x9F):
            continue
        if cp in (0x09, 0x0A, 0x0C, 0x0D, 0x1680, 0x2028, 0x2029, 0x2581, 0xFEFF, 0xFFFD) or 0x200B <= cp <= 0x200F:
            out.append(" ")
        else:
            out.append(c)
    return "".join(out)


_GRAPHEME = regex.compile(r"\X")  # extended grapheme clusters (UAX #29), as the `unicode-segmentation` crate


class PrecompiledCharsmap:
    """SentencePiece's compiled normalization table (see the module docstring for the byte layout).

    `normalize(text)` applies it as Hugging Face's `tokenizers` does (per grapheme cluster); `normalize_longest`
    as SentencePiece does (longest match at each position). Both cache what they computed per cluster/character.
    >>> m = PrecompiledCharsmap.from_rules({"ﬁ": "fi", "Ａ": "A"})
    >>> m.normalize("ﬁne Ａ"), m.normalize_longest("ﬁne Ａ")
    ('fine A', 'fine A')
    """

    def __init__(self, blob: bytes):
        if len(blob) < 4:
            raise TokenizerError("tokenizer.json: precompiled_charsmap is too short")
        n = int.from_bytes(blob[:4], "little")
        if n % 4 or n == 0 or 4 + n > len(blob):
            raise TokenizerError(f"tokenizer.json: precompiled_charsmap's trie size {n} does not fit its "
                                 f"{len(blob)} bytes")
        self.units = array("I", blob[4:4 + n])
        if sys.byteorder == "big":
            self.units.byteswap()
        self.strings = bytes(blob[4 + n:])
        self._replacements: dict[int, str] = {}
        self._clusters: dict[str, str] = {}
        root = self.units[0]
        self._root = (root >> 10) << ((root & 512) >> 6)
        # bytes that can begin a key: text made of other bytes is copied through without walking the trie
        starts = [c for c in range(1, 256) if self._step(self._root, c) is not None]
        self._plain = re.compile(b"[^" + b"".join(re.escape(bytes([c])) for c in starts) + b"]+") if starts else None

    @classmethod
    def from_base64(cls, text: str) -> "PrecompiledCharsmap":
        try:
            return cls(base64.b64decode(text, validate=True))
        except (ValueError, TypeError):
            raise TokenizerError("tokenizer.json: precompiled_charsmap is not base64") from None

    @classmethod
    def from_rules(cls, rules: dict[str, str]) -> "PrecompiledCharsmap":
        """A table from {key: replacement}, with a naive (sparse but valid) double array: for small tests and
        docs; real tables come from SentencePiece's trainer."""
        strings, at = b"", {}
        for key in sorted(rules):
            at[key] = len(strings)
            strings += rules[key].encode("utf-8") + b"\0"
        keys = {k.encode("utf-8"): at[k] for k in rules}
        children: dict[bytes, set[int]] = {}
        for key in keys:  # the key trie: each prefix's next bytes
            for i in range(len(key)):
                children.setdefault(key[:i], set()).add(key[i])
        units = [0]  # unit 0 is the root

        def place(prefix: bytes, node: int) -> None:
            base = (len(units) + 255) // 256 * 256  # a fresh block: children at base ^ c = base + c, leaf at base
            units.extend([0] * (base + 256 - len(units)))
            units[node] |= (base ^ node) << 10
            if prefix in keys:
                units[node] |= 1 << 8
                units[base] = keys[prefix] | (1 << 31)
            for c in sorted(children.get(prefix, ())):
                units[base ^ c] = c
                place(prefix + bytes([c]), base ^ c)

        place(b"", 0)
        blob = b"".join(u.to_bytes(4, "little") for u in units)
        return cls(len(blob).to_bytes(4, "little") + blob + strings)

    # ---- the trie -------------------------------------------------------------------------------------------------
    def _step(self, pos: int, c: int) -> int | None:
        """From node `pos` (already xored with its offset) along byte c: the next such node, or None."""
        nxt = pos ^ c
        if nxt >= len(self.units):
            return None
        unit = self.units[nxt]
        if unit & 0x800000FF != c:
            return None
        return nxt ^ ((unit >> 10) << ((unit & 512) >> 6))

    def _match(self, data: bytes, start: int, end: int, shortest: bool) -> tuple[int, int] | None:
        """(byte length, replacement offset) of the shortest or longest key that data[start:end] begins with."""
        units, pos, found = self.units, self._root, None
        for i in range(start, end):
            c = data[i]
            if c == 0:
                break
            nxt = pos ^ c
            if nxt >= len(units):
                break
            unit = units[nxt]
            if unit & 0x800000FF != c:
                break
            pos = nxt ^ ((unit >> 10) << ((unit & 512) >> 6))
            if (unit >> 8) & 1:
                found = (i + 1 - start, units[pos] & 0x7FFFFFFF)
                if shortest:
                    break
        return found

    def _replacement(self, offset: int) -> str:
        r = self._replacements.get(offset)
        if r is None:
            end = self.strings.find(b"\0", offset)
            r = self.strings[offset:end if end >= 0 else len(self.strings)].decode("utf-8", errors="replace")
            self._replacements[offset] = r
        return r

    # ---- applying it ----------------------------------------------------------------------------------------------
    def _cluster(self, g: str) -> str:
        b = g.encode("utf-8", errors="surrogatepass")
        if len(b) < 6:  # short clusters: replaced whole by the shortest key they begin with
            hit = self._match(b, 0, len(b), shortest=True)
            if hit is not None:
                return self._replacement(hit[1])
        out = []
        for c in g:
            cb = c.encode("utf-8", errors="surrogatepass")
            hit = self._match(cb, 0, len(cb), shortest=True)
            out.append(c if hit is None else self._replacement(hit[1]))
        return "".join(out)

    def normalize(self, text: str) -> str:
        """The table applied as Hugging Face's `tokenizers` applies it: per grapheme cluster."""
        cache, out = self._clusters, []
        for g in _GRAPHEME.findall(text):
            r = cache.get(g)
            if r is None:
                r = self._cluster(g)
                if len(cache) < 100_000:
                    cache[g] = r
            out.append(r)
        return "".join(out)

    def normalize_longest(self, text: str) -> str:
        """The table applied as SentencePiece applies it: at each position the longest key that starts there is
        replaced; where none does, one character is copied."""
        data = text.encode("utf-8", errors="surrogatepass")
        out, i, n = bytearray(), 0, len(data)
        while i < n:
            m = self._plain.match(data, i) if self._plain is not None else None
            if m is not None:
                out += m.group()
                i = m.end()
                continue
            hit = self._match(data, i, n, shortest=False)
            if hit is not None:
                out += self._replacement(hit[1]).encode("utf-8", errors="surrogatepass")
                i += hit[0]
            else:
                lead = data[i]
                step = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
                out += data[i:i + step]
                i += step
        return out.decode("utf-8", errors="surrogatepass")


def _strip_accents(text: str) -> str:
    return "".join(c for c in text if not unicodedata.combining(c))


def _pattern_of(spec: dict[str, Any]) -> re.Pattern:
    """A tokenizer.json pattern: {"String": "x"} (literal) or {"Regex": "x"}."""
    if "String" in spec:
        return re.compile(re.escape(spec["String"]))
    if "Regex" in spec:
        try:
            return re.compile(spec["Regex"])
        except re.error as e:
            raise TokenizerError(f"tokenizer.json: regex {spec['Regex']!r} is not supported ({e})") from None
    raise TokenizerError(f"tokenizer.json: pattern {spec!r} is neither String nor Regex")


def build_normalizer(spec: dict[str, Any] | None):
    """The normalizer of a tokenizer.json as one function str -> str."""
    if spec is None:
        return lambda s: s
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [build_normalizer(s) for s in spec["normalizers"]]

        def run(s: str) -> str:
            for f in steps:
                s = f(s)
            return s
        return run
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    if kind == "Precompiled":  # SentencePiece's compiled table (see the module docstring)
        if not spec.get("precompiled_charsmap"):
            return lambda s: s
        return PrecompiledCharsmap.from_base64(spec["precompiled_charsmap"]).normalize
    if kind == "Nmt":
        return nmt_normalize
    if kind == "Lowercase":
        return str.lower
    if kind == "StripAccents":
        return _strip_accents
    if kind == "Strip":
        left, right = spec.get("strip_left", True), spec.get("strip_right", True)
        return lambda s: (s.lstrip() if left else s).rstrip() if right else (s.lstrip() if left else s)
    if kind == "Replace":
        rx, content = _pattern_of(spec["pattern"]), spec["content"]
        return lambda s: rx.sub(lambda m: content, s)
    if kind == "Prepend":
        prefix = spec["prepend"]
        return lambda s: prefix + s if s else s
    raise TokenizerError(f"tokenizer.json: normalizer {kind!r} is not supported for Unigram models")


# ----------------------------------------------------------------------------------------------------------------
# Pre-tokenizers: str -> list of pieces of text
# ----------------------------------------------------------------------------------------------------------------
def metaspace_split(text: str, replacement: str = "▁", prepend: str = "always", split: bool = True,
                    first: bool = True) -> list[str]:
    """Spaces become "▁"; a "▁" is prepended ("always", or "first" for the text's first segment only) unless the
    text already starts with one; then each "▁" starts a new piece.
    >>> metaspace_split("Hello  world")
    ['▁Hello', '▁', '▁world']
    """
    text = text.replace(" ", replacement)
    if text and (prepend == "always" or (prepend == "first" and first)) and not text.startswith(replacement):
        text = replacement + text
    if not split:
        return [text] if text else []
    pieces, start = [], 0
    for i, c in enumerate(text):
        if c == replacement and i > start:
            pieces.append(text[start:i])
            start = i
    if start < len(text):
        pieces.append(text[start:])
    return pieces


_DIGIT, _DIGITS = regex.compile(r"(\p{N})"), regex.compile(r"(\p{N}+)")  # Rust's char::is_numeric: Nd, Nl, No


def _whitespace_split(text: str) -> list[str]:
    return text.split()


def build_pre_tokenizer(spec: dict[str, Any] | None):
    """(text, is_first_segment) -> list of pre-tokens."""
    if spec is None:
        return lambda s, first: [s] if s else []
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [build_pre_tokenizer(s) for s in spec["pretokenizers"]]

        def run(s: str, first: bool) -> list[str]:
            parts = [s]
            for f in steps:
                parts = [q for p in parts for q in f(p, first)]
            return parts
        return run
    if kind == "Metaspace":
        rep = spec.get("replacement", "▁")
        scheme = spec.get("prepend_scheme") or ("always" if spec.get("add_prefix_space", True) else "never")
        split = spec.get("split", True)
        return lambda s, first: metaspace_split(s, rep, scheme, split, first)
    if kind == "WhitespaceSplit":
        return lambda s, first: _whitespace_split(s)
    if kind == "Digits":  # numbers apart from the text: each digit alone, or each run of digits
        rx = _DIGIT if spec.get("individual_digits", False) else _DIGITS
        return lambda s, first: [p for p in rx.split(s) if p]
    raise TokenizerError(f"tokenizer.json: pre-tokenizer {kind!r} is not supported for Unigram models")


# ----------------------------------------------------------------------------------------------------------------
# The Unigram model
# ----------------------------------------------------------------------------------------------------------------
def viterbi(word: str, pieces: dict[str, tuple[int, float]], max_len: int, unk_score: float
            ) -> list[tuple[str, bool]]:
    """The highest-scoring cut of `word` into vocabulary pieces: [(piece, known)], unknown runs fused.

    best[j] = (score, start, known) of the best cut of word[:j]. Pieces are tried shortest first and a later
    candidate must score strictly higher, the tie rule of the `tokenizers` library.
    >>> viterbi("abc", {"a": (0, -1.0), "b": (1, -1.0), "ab": (2, -1.5), "c": (3, -1.0)}, 2, -11.0)
    [('ab', True), ('c', True)]
    """
    n = len(word)
    best: list[tuple[float, int, bool] | None] = [None] * (n + 1)
    best[0] = (0.0, 0, True)
    for i in range(n):
        here = best[i][0]
        single = False
        for j in range(i + 1, min(n, i + max_len) + 1):
            hit = pieces.get(word[i:j])
            if hit is None:
                continue
            cand = hit[1] + here
            if best[j] is None or cand > best[j][0]:
                best[j] = (cand, i, True)
            if j == i + 1:
                single = True
        if not single:  # no piece is this one character: it becomes <unk>
            cand = unk_score + here
            if best[i + 1] is None or cand > best[i + 1][0]:
                best[i + 1] = (cand, i, False)
    out: list[tuple[str, bool]] = []
    end, unk_run = n, ""
    while end > 0:
        _, start, known = best[end]
        if not known:
            unk_run = word[start:end] + unk_run  # consecutive unknowns fuse into one token
        else:
            if unk_run:
                out.append((unk_run, False))
                unk_run = ""
            out.append((word[start:end], True))
        end = start
    if unk_run:
        out.append((unk_run, False))
    return out[::-1]


class UnigramTokenizer:
    """A SentencePiece-style Unigram tokenizer read from (and written back to) a Hugging Face tokenizer.json."""

    def __init__(self, data: dict[str, Any], config: dict[str, Any] | None = None):
        model = data.get("model") or {}
        if model.get("type") != "Unigram":
            raise TokenizerError(f"tokenizer.json: model type {model.get('type')!r} is not Unigram")
        self.data = data
        self.config = dict(config or {})  # tokenizer_config.json (special token names), kept for saving
        vocab = model.get("vocab")
        if not isinstance(vocab, list) or not vocab:
            raise TokenizerError("tokenizer.json: the Unigram model has no vocab")
        self.vocab: list[tuple[str, float]] = [(str(p), float(s)) for p, s in vocab]
        self.pieces = {p: (i, s) for i, (p, s) in enumerate(self.vocab)}
        self.max_piece_len = max(len(p) for p, _ in self.vocab)
        self.unk_id: int | None = model.get("unk_id")
        self.byte_fallback = bool(model.get("byte_fallback", False))
        self.unk_score = min(s for _, s in self.vocab) - UNK_PENALTY
        self.added = {t["content"]: t for t in data.get("added_tokens") or []}
        self.special_ids = {t["id"] for t in self.added.values() if t.get("special")}
        self._id_to_piece = {i: p for i, (p, _) in enumerate(self.vocab)}
        self._id_to_piece.update({t["id"]: c for c, t in self.added.items()})
        self._normalize = build_normalizer(data.get("normalizer"))
        self._pre_tokenize = build_pre_tokenizer(data.get("pre_tokenizer"))
        self._post = data.get("post_processor")
        self._decoder = data.get("decoder")
        self._check_post_processor(self._post)
        # added tokens matched in the raw text, longest first (leftmost-longest, as the `tokenizers` library)
        raw = sorted((c for c, t in self.added.items() if c and not t.get("normalized", False)), key=len,
                     reverse=True)
        self._added_rx = re.compile("|".join(re.escape(c) for c in raw)) if raw else None
        self._cache: dict[str, list[int]] = {}

    # ---- vocabulary --------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self._id_to_piece) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"UnigramTokenizer(vocab_size={self.vocab_size}, byte_fallback={self.byte_fallback})"

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]["id"]
        hit = self.pieces.get(token)
        return hit[0] if hit else None

    def id_to_token(self, i: int) -> str:
        if i not in self._id_to_piece:
            raise TokenizerError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        return self._id_to_piece[i]

    def _special(self, name: str, default: str) -> int | None:
        tok = self.config.get(name, default)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self.token_to_id(tok) if tok else None

    @property
    def eos_token_id(self) -> int | None:
        return self._special("eos_token", "</s>")

    @property
    def pad_token_id(self) -> int | None:
        return self._special("pad_token", "<pad>")

    @property
    def unk_token_id(self) -> int | None:
        return self.unk_id

    bos_token_id = None  # T5 has no BOS
    add_bos_token = False

    # ---- encoding ----------------------------------------------------------------------------------------------
    def _split_added(self, text: str) -> list[tuple[str, bool]]:
        """[(segment, is_added_token)]: added tokens written in the text are cut out before normalization;
        `lstrip`/`rstrip` tokens also swallow the whitespace on that side."""
        if self._added_rx is None:
            return [(text, False)]
        out, pos = [], 0
        for m in self._added_rx.finditer(text):
            start, end = m.start(), m.end()
            spec = self.added[m.group()]
            before = text[pos:start]
            if spec.get("lstrip"):
                before = before.rstrip()
            out.append((before, False))
            out.append((m.group(), True))
            pos = end
            if spec.get("rstrip"):
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        out.append((text[pos:], False))
        return [(s, a) for s, a in out if s or a]

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = []
        for piece, known in viterbi(word, self.pieces, self.max_piece_len, self.unk_score):
            if known:
                ids.append(self.pieces[piece][0])
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.pieces for b in piece.encode("utf-8")):
                ids.extend(self.pieces[f"<0x{b:02X}>"][0] for b in piece.encode("utf-8"))
            elif self.unk_id is None:
                raise TokenizerError(f"cannot encode {piece!r}: no vocabulary piece covers it and the model has "
                                     "no unk_id")
            else:
                ids.append(self.unk_id)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Text -> piece strings (no post-processing): "Hello world" -> ['▁Hello', '▁world']."""
        return [self._id_to_piece[i] for i in self.encode(text, add_special_tokens=False)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids, as `tokenizers.Tokenizer.encode(text).ids` for the same file."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a string, got {type(text).__name__}")
        ids: list[int] = []
        first = True
        for segment, is_added in self._split_added(text):
            if is_added:
                ids.append(self.added[segment]["id"])
            else:
                for word in self._pre_tokenize(self._normalize(segment), first):
                    ids.extend(self._word_ids(word))
            first = False
        return self._post_process(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def _check_post_processor(self, spec: dict[str, Any] | None) -> None:
        if spec is not None and spec.get("type") != "TemplateProcessing":
            raise TokenizerError(f"tokenizer.json: post-processor {spec.get('type')!r} is not supported for "
                                 "Unigram models (TemplateProcessing)")

    def _post_process(self, ids: list[int]) -> list[int]:
        """TemplateProcessing's `single` template: $A with special tokens around it (T5: $A </s>)."""
        if self._post is None:
            return ids
        out: list[int] = []
        for item in self._post["single"]:
            if "Sequence" in item:
                out.extend(ids)
            else:
                out.extend(self._post["special_tokens"][item["SpecialToken"]["id"]]["ids"])
        return out

    # ---- decoding ----------------------------------------------------------------------------------------------
    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_token(int(i)) for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text, as `tokenizers.Tokenizer.decode` (Metaspace: "▁" -> " ", the first one dropped)."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = True) -> bytes:
        """Token ids -> UTF-8 bytes (byte pieces give their raw byte, so a character split over pieces is whole
        again only once all its pieces are there: what incremental detokenization needs)."""
        tokens = [self.id_to_token(int(i)) for i in ids
                  if not (skip_special_tokens and int(i) in self.special_ids)]
        return _run_decoder(self._decoder, tokens)

    # ---- files -------------------------------------------------------------------------------------------------
    @classmethod
    def from_tokenizer_json(cls, data: dict[str, Any] | str | os.PathLike,
                            config: dict[str, Any] | None = None) -> "UnigramTokenizer":
        if not isinstance(data, dict):
            try:
                data = json.loads(Path(data).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{data}: cannot read tokenizer.json ({e})") from None
        return cls(data, config)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UnigramTokenizer":
        """From a directory (tokenizer.json + optional tokenizer_config.json) or a tokenizer.json file."""
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.exists():
            raise TokenizerError(f"{p}: no tokenizer.json")
        cfg_file = f.parent / "tokenizer_config.json"
        config = {}
        if cfg_file.exists():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_file}: not JSON ({e})") from None
        return cls.from_tokenizer_json(f, config)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json (the file as read) and a tokenizer_config.json that transformers' AutoTokenizer
        reads (PreTrainedTokenizerFast with T5's special tokens)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_write(d / "tokenizer.json") as f:
            f.write(json.dumps(self.data, ensure_ascii=False))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **self.config}
        for name, default in (("eos_token", "</s>"), ("pad_token", "<pad>"), ("unk_token", "<unk>")):
            if name not in cfg and self.token_to_id(default) is not None:
                cfg[name] = default
        atomic_write_json(d / "tokenizer_config.json", cfg)
        return d


def _run_decoder(spec: dict[str, Any] | None, tokens: list[str]) -> bytes:
    """Apply a tokenizer.json decoder chain to piece strings; byte pieces (<0x41>) become raw bytes."""
    parts: list[str | bytes] = list(tokens)
    for step in (spec.get("decoders") if spec and spec.get("type") == "Sequence" else [spec] if spec else []):
        parts = _decoder_step(step, parts)
    return b"".join(p if isinstance(p, bytes) else p.encode("utf-8") for p in parts)


def _decoder_step(spec: dict[str, Any], parts: list[str | bytes]) -> list[str | bytes]:
    kind = spec.get("type")
    if kind == "Metaspace":
        rep = spec.get("replacement", "▁")
        scheme = spec.get("prepend_scheme") or ("always" if spec.get("add_prefix_space", True) else "never")
        out = []
        for i, p in enumerate(parts):
            if isinstance(p, str):
                # the first token's "▁" were prepended by encoding: dropped (all of them, as `tokenizers` does)
                p = p.replace(rep, "" if (i == 0 and scheme != "never") else " ")
            out.append(p)
        return out
    if kind == "ByteFallback":
        return [bytes([int(m.group(1), 16)]) if isinstance(p, str) and (m := _BYTE_PIECE.match(p)) else p
                for p in parts]
    if kind == "Fuse":
        return [b"".join(p if isinstance(p, bytes) else p.encode("utf-8") for p in parts)] if parts else []
    if kind == "Replace":
        rx, content = _pattern_of(spec["pattern"]), spec["content"]
        return [rx.sub(lambda m: content, p) if isinstance(p, str) else p for p in parts]
    if kind == "Strip":
        content, start, stop = spec.get("content", " "), spec.get("start", 0), spec.get("stop", 0)
        out = []
        for p in parts:
            s = p.decode("utf-8", errors="replace") if isinstance(p, bytes) else p
            for _ in range(start):
                s = s[len(content):] if s.startswith(content) else s
            for _ in range(stop):
                s = s[:-len(content)] if s.endswith(content) else s
            out.append(s)
        return out
    raise TokenizerError(f"tokenizer.json: decoder {kind!r} is not supported for Unigram models")
