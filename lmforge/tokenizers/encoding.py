"""What an encoder's tokenizer returns, and the calls every encoder tokenizer shares.

An encoder reads one text or a pair of texts ("question", "passage") wrapped in special tokens, so its tokenizer
does more than map text to ids. Each input becomes an `Encoding`: the ids, and beside them the token strings,
the character span each token came from (`offsets`), the word it belongs to (`word_ids`), which of the two texts
it came from (`sequence_ids`) and its segment (`type_ids`). NER aligns word labels to tokens with `word_ids`; QA maps
a predicted token span back to characters with `offsets`.

Two tokenizers fill these in differently (BERT's WordPiece in `lmforge.tokenizers.wordpiece`, RoBERTa's and BART's
byte-level BPE in `lmforge.tokenizers.roberta`), and then do the same things: truncate a pair as the `tokenizers`
library does (`truncate_pair`), add the special tokens of the model's template, pad a batch. `PairEncoderMixin`
holds those shared steps; a tokenizer class provides three methods:

    _encode_words(texts, fast) -> [Encoding]       the tokens of each text, no special tokens
    _post_process(a, b, add_special_tokens)         the model's template around one text or a pair
    num_special_tokens(pair) -> int                 how many tokens that template adds

and the attributes `pad_token_id` and `model_max_length`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from lmforge.errors import TokenizerError


@dataclass
class Encoding:
    """One input (a text or a text pair) after tokenization: parallel lists, one entry per token."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]  # character span in its own text; (0, 0) for special tokens
    word_ids: list[int | None]  # which word of its sequence; None for special tokens
    sequence_ids: list[int | None] = field(default_factory=list)  # 0 (text), 1 (pair text), None (special)
    type_ids: list[int] = field(default_factory=list)
    num_truncated: int = 0  # tokens dropped by truncation

    def __len__(self) -> int:
        return len(self.ids)

    def _keep(self, n: int) -> "Encoding":
        return Encoding(self.ids[:n], self.tokens[:n], self.offsets[:n], self.word_ids[:n],
                        num_truncated=len(self.ids) - n)


def truncate_pair(n1: int, n2: int, budget: int, strategy: str) -> tuple[int, int]:
    """How many tokens of each sequence to keep so that n1 + n2 <= budget (the `tokenizers` library's rules).

    longest_first: take from the longer one until both are equal, then from both alternately.
        truncate_pair(3, 30, 20, "longest_first") -> (3, 17);  (15, 15, 20) -> (10, 10)
    only_first / only_second: take only from that one; an error if it is too short to make room.
    """
    if n1 + n2 <= budget:
        return n1, n2
    if strategy == "longest_first":
        if n2 == 0:
            return min(n1, budget), 0
        a, b = (n2, n1) if n1 > n2 else (n1, n2)  # a <= b
        b = a if a > budget else max(a, budget - a)
        if a + b > budget:
            a = budget // 2
            b = a + budget % 2
        k1, k2 = (b, a) if n1 > n2 else (a, b)
        return min(n1, k1), min(n2, k2)
    extra = n1 + n2 - budget
    if strategy == "only_first":
        if extra > n1:
            raise TokenizerError(f"truncation='only_first' cannot make room: the first text has {n1} tokens but "
                                 f"{extra} must go; use truncation='longest_first' or a larger max_length")
        return n1 - extra, n2
    if strategy == "only_second":
        if extra > n2:
            raise TokenizerError(f"truncation='only_second' cannot make room: the second text has {n2} tokens but "
                                 f"{extra} must go; use truncation='longest_first' or a larger max_length")
        return n1, n2 - extra
    raise TokenizerError(f"unknown truncation {strategy!r}; use True, 'longest_first', 'only_first' or 'only_second'")


class BatchEncoding(dict):
    """A dict of `input_ids`, `token_type_ids`, `attention_mask` (and `offset_mapping` when asked for), lists or
    tensors, plus the per-input `encodings`, `word_ids(i)`, `sequence_ids(i)` and `num_truncated`."""

    def __init__(self, data: dict[str, Any], encodings: list[Encoding]):
        super().__init__(data)
        self.encodings = encodings

    def word_ids(self, i: int = 0) -> list[int | None]:
        return self.encodings[i].word_ids

    def sequence_ids(self, i: int = 0) -> list[int | None]:
        return self.encodings[i].sequence_ids

    @property
    def num_truncated(self) -> list[int]:
        return [e.num_truncated for e in self.encodings]

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def truncation_strategy(truncation: bool | str | None) -> str | None:
    """Hugging Face's truncation argument -> a strategy name or None: True -> "longest_first", False -> None."""
    if truncation in (False, None, "do_not_truncate"):
        return None
    if truncation is True:
        return "longest_first"
    if truncation in ("longest_first", "only_first", "only_second"):
        return truncation
    raise TokenizerError(f"unknown truncation {truncation!r}; use True, 'longest_first', 'only_first' or "
                         "'only_second'")


class PairEncoderMixin:
    """`encode`, `encode_plus`, `encode_batch`, `tok(...)` (Hugging Face's call), `pad`, `tokenize`: the same for
    every encoder tokenizer, given `_encode_words`, `_post_process` and `num_special_tokens` (module docstring)."""

    model_max_length: int = 512

    def tokenize(self, text: str) -> list[str]:
        """The tokens of one text, without the template's special tokens: "Hello world!" -> ["hello", "world", "!"]
        (BERT's WordPiece), ["Hello", "Ġworld", "!"] (RoBERTa's byte-level BPE)."""
        self._check_text(text)
        return self._encode_words([text])[0].tokens

    def _check_text(self, text: Any) -> None:
        if not isinstance(text, str):
            raise TokenizerError(f"expected a string to tokenize, got {type(text).__name__}")

    def encode(self, text: str, text_pair: str | None = None, *, add_special_tokens: bool = True,
               truncation: bool | str = False, max_length: int | None = None) -> list[int]:
        """Ids of one text (or pair): encode("Hello world!") -> [101, 7592, 2088, 999, 102]."""
        return self.encode_plus(text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                                max_length=max_length).ids

    def encode_plus(self, text: str, text_pair: str | None = None, *, add_special_tokens: bool = True,
                    truncation: bool | str = False, max_length: int | None = None, fast: bool | None = None
                    ) -> Encoding:
        return self.encode_batch([text], None if text_pair is None else [text_pair],
                                 add_special_tokens=add_special_tokens, truncation=truncation,
                                 max_length=max_length, fast=fast)[0]

    def encode_batch(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *,
                     add_special_tokens: bool = True, truncation: bool | str = False, max_length: int | None = None,
                     fast: bool | None = None) -> list[Encoding]:
        """One `Encoding` per input, unpadded, truncated as asked (the counts in `.num_truncated`)."""
        for t in texts:
            self._check_text(t)
        if text_pairs is not None:
            if len(text_pairs) != len(texts):
                raise TokenizerError(f"{len(texts)} texts but {len(text_pairs)} pair texts; give one pair per text")
            for t in text_pairs:
                self._check_text(t)
        strategy = truncation_strategy(truncation)
        if strategy and max_length is None:
            max_length = self.model_max_length
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise TokenizerError(f"max_length={max_length!r} must be a positive integer")
        words = self._encode_words(list(texts) + list(text_pairs or []), fast)
        firsts, seconds = words[:len(texts)], (words[len(texts):] if text_pairs is not None else [None] * len(texts))
        out = []
        for a, b in zip(firsts, seconds):
            if strategy:
                budget = max_length - (self.num_special_tokens(b is not None) if add_special_tokens else 0)
                if budget < 0:
                    raise TokenizerError(f"max_length={max_length} leaves no room for the special tokens")
                k1, k2 = truncate_pair(len(a), len(b) if b is not None else 0, budget, strategy)
                a = a._keep(k1)
                b = b._keep(k2) if b is not None else None
            out.append(self._post_process(a, b, add_special_tokens))
        return out

    def __call__(self, text: str | Sequence[str], text_pair: str | Sequence[str] | None = None, *,
                 padding: bool | str = False, truncation: bool | str = False, max_length: int | None = None,
                 add_special_tokens: bool = True, return_tensors: str | None = None,
                 return_offsets_mapping: bool = False, pad_to_multiple_of: int | None = None) -> BatchEncoding:
        """Hugging Face's call: one text -> lists; a list of texts -> lists of lists (or "pt" tensors).

        padding: False | True / "longest" (pad to the longest in the batch) | "max_length"
        truncation: False | True / "longest_first" | "only_first" | "only_second"
        """
        single = isinstance(text, str)
        if not single and not isinstance(text, (list, tuple)):
            raise TokenizerError(f"expected a string or a list of strings, got {type(text).__name__}")
        texts = [text] if single else list(text)
        if text_pair is not None and not isinstance(text_pair, (str, list, tuple)):
            raise TokenizerError(f"expected text_pair as a string or a list of strings, got "
                                 f"{type(text_pair).__name__}")
        pairs = None if text_pair is None else ([text_pair] if isinstance(text_pair, str) else list(text_pair))
        encs = self.encode_batch(texts, pairs, add_special_tokens=add_special_tokens, truncation=truncation,
                                 max_length=max_length)
        return self.pad(encs, padding=padding, max_length=max_length, return_tensors=return_tensors,
                        return_offsets_mapping=return_offsets_mapping, pad_to_multiple_of=pad_to_multiple_of,
                        single=single)

    def pad(self, encs: list[Encoding], *, padding: bool | str = True, max_length: int | None = None,
            return_tensors: str | None = None, return_offsets_mapping: bool = False,
            pad_to_multiple_of: int | None = None, single: bool = False) -> BatchEncoding:
        """Right-pad encodings to one length: pad id, token type 0, attention_mask 0, offset (0, 0)."""
        if padding in (True, "longest"):
            width = max((len(e) for e in encs), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise TokenizerError("padding='max_length' needs max_length")
            width = max_length
        elif padding in (False, None, "do_not_pad"):
            width = None
        else:
            raise TokenizerError(f"unknown padding {padding!r}; use True, 'longest', 'max_length' or False")
        if width is not None and pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        cols: dict[str, list] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        if return_offsets_mapping:
            cols["offset_mapping"] = []
        padded: list[Encoding] = []
        for e in encs:
            n = 0 if width is None else max(0, width - len(e))
            cols["input_ids"].append(e.ids + [self.pad_token_id] * n)
            cols["token_type_ids"].append(e.type_ids + [0] * n)
            cols["attention_mask"].append([1] * len(e) + [0] * n)
            if return_offsets_mapping:
                cols["offset_mapping"].append(list(e.offsets) + [(0, 0)] * n)
            if n:  # a padded copy: the caller's Encoding stays as it was
                e = replace(e, word_ids=e.word_ids + [None] * n, sequence_ids=e.sequence_ids + [None] * n)
            padded.append(e)
        if return_tensors == "pt":
            import torch

            if width is None and len({len(e) for e in encs}) > 1:
                raise TokenizerError("return_tensors='pt' needs inputs of one length: pass padding=True")
            cols = {k: torch.tensor(v, dtype=torch.long) for k, v in cols.items()}
        elif return_tensors is not None:
            raise TokenizerError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")
        elif single:
            cols = {k: v[0] for k, v in cols.items()}
        return BatchEncoding(cols, padded)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_token(int(i)) for i in ids]
