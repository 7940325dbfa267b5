"""Side by side: how several tokenizers cut the same text ("words are not tokens").

A model never sees words. It sees whatever pieces its tokenizer cuts, and different tokenizers cut the same sentence
very differently: a character tokenizer makes one token per character, a word tokenizer one per word (and has no
id for a word it never saw), and subword tokenizers (BPE, WordPiece, SentencePiece) land in between. A frequent word
is one token, a rare one several pieces, numbers may be cut into groups of digits, and non-English text often costs
several tokens per character. The number of tokens is what a context window, a price per token and the compute
of a forward pass are counted in, so "how many characters does one token cover" (chars/token) is the usual
measure of how well a tokenizer fits a kind of text.

    rows = compare_tokenizers("Tokenization isn't free: 12345 ünïcödé", {"gpt2": gpt2, "char": char})
    print(format_comparison(text, rows))

Each `Split` holds the pieces as the tokenizer stores them (bytes: a byte-level BPE piece may be part of a UTF-8
character, and SentencePiece-style pieces carry "▁" for a space), so the boundaries shown are the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass
class Split:
    """One tokenizer's cut of the text."""

    name: str
    kind: str  # the tokenizer's class, e.g. "Tokenizer", "HFTokenizer", "CharTokenizer"
    vocab_size: int
    ids: list[int]
    pieces: list[bytes]  # what each id stands for, in order

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def split_text(name: str, tokenizer: Any, text: str) -> Split:
    """Encode `text` (special-token text allowed as specials, as a chat would send it) and name every piece."""
    ids = tokenizer.encode(text, allowed_special="all")
    pieces = [tokenizer.id_to_token(i) for i in ids]
    return Split(name, type(tokenizer).__name__, tokenizer.vocab_size, ids, pieces)


def compare_tokenizers(text: str, tokenizers: Mapping[str, Any]) -> list[Split]:
    """`split_text` for each named tokenizer, in order."""
    return [split_text(name, tok, text) for name, tok in tokenizers.items()]


def show_piece(piece: bytes) -> str:
    """A piece as readable text: bytes that are not whole UTF-8 characters as \\xNN, newlines and tabs escaped.
    b" the" -> " the";  b"\\xe6\\x97" (two bytes of one CJK character) -> "\\xe6\\x97"."""
    text = piece.decode("utf-8", errors="backslashreplace")
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def format_comparison(text: str, splits: list[Split], colours: list[str] | None = None, reset: str = "") -> str:
    """The report `lmforge tokenizer compare` prints: each tokenizer's pieces between [brackets] (or on alternating
    background colours), then a table of token counts and characters per token."""
    words = len(text.split())
    lines = [f"text: {len(text)} characters, {len(text.encode('utf-8'))} bytes, {words} words "
             "(whitespace-separated)", ""]
    for s in splits:
        if colours:
            shown = "".join(f"{colours[k % len(colours)]}{show_piece(p)}{reset}" for k, p in enumerate(s.pieces))
        else:
            shown = "".join(f"[{show_piece(p)}]" for p in s.pieces)
        lines += [f"{s.name} ({s.kind}, vocab {s.vocab_size:,}): {s.n_tokens} tokens", f"  {shown}", ""]
    width = max([len(s.name) for s in splits] + [9])
    lines.append(f"{'tokenizer':<{width}}  {'vocab':>9}  {'tokens':>6}  {'chars/token':>11}  {'tokens/word':>11}")
    for s in splits:
        per_token = len(text) / s.n_tokens if s.n_tokens else float("nan")
        per_word = s.n_tokens / words if words else float("nan")
        lines.append(f"{s.name:<{width}}  {s.vocab_size:>9,}  {s.n_tokens:>6}  {per_token:>11.2f}  {per_word:>11.2f}")
    return "\n".join(lines)
