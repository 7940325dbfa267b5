"""The two tokenizers a course starts from, before byte-level BPE: words and characters.

Both learn their vocabulary from a training text and share `lmforge.tokenizers.bpe.Tokenizer`'s interface (`encode`,
`decode`, `decode_bytes`, `vocab`, `vocab_size`, `special_tokens`, `save`/`load`), so a model can be trained on
either and the trade-off seen first hand:

* `WordTokenizer` (as in Raschka, "Build a Large Language Model (From Scratch)", ch. 2): split on whitespace and
  punctuation with a regex, give each distinct word an id. Sequences are short, but the vocabulary grows with
  the corpus and any word not seen in training becomes ``<|unk|>`` — the information is lost. Decoding joins
  words with spaces, so the exact spacing of the input is lost too.
* `CharTokenizer` (as in Karpathy's nanoGPT shakespeare_char): one id per distinct character. A tiny vocabulary
  and lossless for the characters it saw, but sequences are as long as the text, so a context window of T tokens
  covers only T characters; unseen characters become ``<|unk|>``.

Byte-level BPE (`lmforge.tokenizers.bpe.Tokenizer`) sits between: nothing is unknown (every byte has an id), and
frequent words are single tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import regex

from lmforge.tokenizers.batch import BatchCallMixin
from lmforge.errors import DataError, TokenizerError
from lmforge.tokenizers.bpe import TOKENIZER_KINDS, AllowedSpecial, Tokenizer, _as_texts, _read_json_file

UNK = "<|unk|>"
ENDOFTEXT = "<|endoftext|>"

#: The course's split: punctuation, the double dash, and whitespace are separators; punctuation is kept.
WORD_SPLIT = r"""([,.:;?_!"()']|--|\s)"""


class _Basic(BatchCallMixin):
    """What the word and character tokenizers share: a fixed vocabulary, `<|unk|>`, tiktoken-style specials."""

    kind = "basic"
    merges: list[tuple[bytes, bytes]] = []
    add_bos_token = False
    chat_template = None
    pattern = None

    def __init__(self, tokens: Sequence[str], special_tokens: Sequence[str] = (ENDOFTEXT, UNK)):
        specials = list(dict.fromkeys(special_tokens))
        if UNK not in specials:
            specials.append(UNK)
        tokens = [t for t in dict.fromkeys(tokens) if t not in specials]
        self.itos: list[str] = tokens + specials
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self.special_tokens: dict[str, int] = {s: self.stoi[s] for s in specials}
        self.added_tokens: dict[str, int] = {}
        self.unk_token = UNK
        self.unk_token_id = self.stoi[UNK]
        eot = self.special_tokens.get(ENDOFTEXT)
        self.bos_token_id = self.eos_token_id = eot
        self.pad_token_id = None

    bos_token = property(lambda self: None if self.bos_token_id is None else self.itos[self.bos_token_id])
    eos_token = property(lambda self: None if self.eos_token_id is None else self.itos[self.eos_token_id])
    pad_token = property(lambda self: None)

    @property
    def vocab(self) -> dict[int, bytes]:
        return {i: s.encode("utf-8") for i, s in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def token_to_id(self, token: str) -> int | None:
        return self.stoi.get(token)

    _alternation = staticmethod(Tokenizer._alternation)
    _resolve_special = Tokenizer._resolve_special

    def _split(self, text: str) -> list[str]:
        raise NotImplementedError

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset(),
               disallowed_special: AllowedSpecial = "all", fast: bool | None = None) -> list[int]:
        """Text -> ids; unknown pieces -> `<|unk|>`. Specials follow tiktoken's rules like `Tokenizer.encode`."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        allowed = self._resolve_special(text, allowed_special, disallowed_special)
        out: list[int] = []
        chunks = [text]
        if allowed:
            chunks = regex.split(f"({self._alternation(allowed).pattern})", text)
        for chunk in chunks:
            if chunk in allowed:
                out.append(self.special_tokens[chunk])
            elif chunk:
                out.extend(self.stoi.get(p, self.unk_token_id) for p in self._split(chunk))
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode(text, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], **kwargs: Any) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def _pieces(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.itos):
                raise TokenizerError(f"token id {i!r} is not in the vocabulary (size {self.vocab_size})")
            out.append(self.itos[i])
        return out

    def id_to_token(self, i: int) -> bytes:
        return self.decode_bytes([i])

    def to_dict(self) -> dict[str, Any]:
        specials = list(self.special_tokens)
        return {"type": self.kind, "version": 1, "tokens": self.itos[:len(self.itos) - len(specials)],
                "special_tokens": specials}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "_Basic":
        try:
            tokens, specials = d["tokens"], d["special_tokens"]
            if not all(isinstance(t, str) for t in [*tokens, *specials]):
                raise TypeError("tokens must be strings")
        except (KeyError, TypeError) as e:
            raise TokenizerError(f"corrupt {cls.kind} tokenizer file ({e})") from None
        return cls(tokens, specials)

    def save(self, path: str | os.PathLike) -> Path:
        """Save as JSON (a .json path, or a directory that receives tokenizer.json); `Tokenizer.load` reads it."""
        from lmforge.utils import atomic_write_json

        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Any:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        data = _read_json_file(file)
        if not isinstance(data, dict) or data.get("type") != cls.kind:
            kind = data.get("type") if isinstance(data, dict) else None
            raise TokenizerError(f"{file}: holds a {kind or 'different'} tokenizer, not a {cls.__name__}")
        return cls.from_dict(data)


class WordTokenizer(_Basic):
    """Word-level: the course's regex split, one id per distinct word or punctuation mark, `<|unk|>` otherwise.

    >>> tok = WordTokenizer.train(["Hello, world. Is this-- a test?"])
    >>> tok.decode(tok.encode("Hello, do you like tea?"))
    'Hello, <|unk|> <|unk|> <|unk|> <|unk|>?'
    """

    kind = "lmforge.word"

    def _split(self, text: str) -> list[str]:
        return [p.strip() for p in regex.split(WORD_SPLIT, text) if p.strip()]

    @classmethod
    def train(cls, texts_or_paths: Any, vocab_size: int | None = None,
              special_tokens: Sequence[str] = (ENDOFTEXT, UNK)) -> "WordTokenizer":
        """The vocabulary: every distinct word (sorted), or the `vocab_size - len(specials)` most frequent ones."""
        from collections import Counter

        texts = _as_texts(texts_or_paths)
        counts: Counter = Counter()
        probe = cls([], special_tokens)
        for t in texts:
            counts.update(probe._split(t))
        if not counts:
            raise DataError("empty corpus: nothing to train the tokenizer on")
        words = sorted(counts)
        if vocab_size is not None:
            n_special = len(probe.special_tokens)
            if vocab_size <= n_special:
                raise TokenizerError(f"vocab_size {vocab_size} must be larger than the {n_special} special tokens")
            keep = {w for w, _ in counts.most_common(vocab_size - n_special)}
            words = [w for w in words if w in keep]
        return cls(words, special_tokens)

    def decode(self, ids: Iterable[int]) -> str:
        """Join words with spaces, then remove the space before punctuation (the course's `decode`)."""
        text = " ".join(self._pieces(ids))
        return regex.sub(r"""\s+([,.?!"()'])""", r"\1", text)


class CharTokenizer(_Basic):
    """Character-level: one id per distinct character seen in training (nanoGPT's shakespeare_char).

    >>> tok = CharTokenizer.train(["hello world"])
    >>> tok.vocab_size, tok.decode(tok.encode("hold"))
    (10, 'hold')
    """

    kind = "lmforge.char"

    def _split(self, text: str) -> list[str]:
        return list(text)

    @classmethod
    def train(cls, texts_or_paths: Any, vocab_size: int | None = None,
              special_tokens: Sequence[str] = (ENDOFTEXT, UNK)) -> "CharTokenizer":
        chars: set[str] = set()
        for t in _as_texts(texts_or_paths):
            chars.update(t)
        if not chars:
            raise DataError("empty corpus: nothing to train the tokenizer on")
        tok = cls(sorted(chars), special_tokens)
        if vocab_size is not None and vocab_size < tok.vocab_size:
            raise TokenizerError(f"vocab_size {vocab_size} is smaller than the {tok.vocab_size} distinct characters "
                                 "and special tokens of the corpus")
        return tok

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._pieces(ids))


TOKENIZER_KINDS[WordTokenizer.kind] = WordTokenizer
TOKENIZER_KINDS[CharTokenizer.kind] = CharTokenizer
