"""RoBERTa's and BART's tokenizer: GPT-2's byte-level BPE inside an encoder's template, with ids equal to HF's.

RoBERTa (Liu et al. 2019) kept BERT's architecture and swapped WordPiece for GPT-2's byte-level BPE: every string
is encodable, nothing is ever `<unk>`, and no lower-casing or accent stripping loses information. BART (Lewis et
al. 2019) uses the same vocabulary and the same tokenizer. What the encoder side adds to GPT-2's tokenizer:

    1. added tokens   `<s>`, `</s>`, `<pad>`, `<unk>`, `<mask>` typed in the text are cut out first, so
                      "Paris is the <mask> of France." keeps its mask. `<mask>` is *lstrip*: it eats the
                      whitespace before it, so " <mask>" is one token and the model sees no stray space.
    2. prefix space   (add_prefix_space) GPT-2's tokens carry their leading space ("Ġworld"), so the first word
                      of a text, with no space before it, gets a different token than the same word inside a
                      sentence. add_prefix_space=True puts a space in front of each piece of text, so the first
                      word is tokenized like any other (NER over pre-split words needs this).
    3. pre-tokenize   GPT-2's regex: words with their leading space, numbers, punctuation runs, whitespace.
                      Each pre-token is a "word" (`word_ids`).
    4. BPE            the merges, exactly `lmforge.tokenizers.bpe.Tokenizer`'s (one implementation of BPE).
    5. template       `<s> A </s>` and, for pairs, `<s> A </s></s> B </s>` (RobertaProcessing): two separators
                      between the texts, and no token types (all 0): RoBERTa has no segment embedding to learn.

Offsets (the character span of each token, for QA and NER) follow the `tokenizers` library: a token covers the
characters of its bytes, and with trim_offsets its leading/trailing spaces are not part of its span ("Ġworld" in
"Hello world" is (6, 11)). The one space that add_prefix_space put in front of a text is kept in the span of the
text's first token, as the library does (its quirk on later pieces of text, after an added token, is reproduced
too: tests/test_roberta_tokenizer.py compares every offset).

Files: a tokenizer.json (ByteLevel pre-tokenizer, BPE model, RobertaProcessing or an equivalent
TemplateProcessing), or the older pair vocab.json + merges.txt with tokenizer_config.json. Truncation, padding,
`tok(texts, padding=True, truncation=True, max_length=...)` and pairs come from `PairEncoderMixin`
(`lmforge.tokenizers.encoding`), the same code as BERT's WordPiece.

    tok = RobertaTokenizer.load("path/to/roberta-or-bart-dir")
    tok("Hello world")["input_ids"]                       # [0, 31414, 232, 2] with roberta-base's files
    tok(["a question", "b"], ["its passage", "c"], padding=True, truncation="only_second", max_length=64)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import regex

from lmforge.errors import TokenizerError
from lmforge.tokenizers.bpe import GPT2_PATTERN, Tokenizer, token_to_unicode, unicode_to_token
from lmforge.tokenizers.encoding import Encoding, PairEncoderMixin
from lmforge.utils import atomic_write, atomic_write_json

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "pad_token": "<pad>",
            "cls_token": "<s>", "mask_token": "<mask>"}
# Rust's char::is_whitespace: what `lstrip`/`rstrip` of an added token and trim_offsets remove
_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                        "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_SPACE_CHAR = token_to_unicode(b" ")  # "Ġ"


class AddedToken:
    """A token matched in the raw text before BPE (`<mask>`, `<s>`, ...). lstrip/rstrip: the whitespace on that
    side belongs to the token, not to the text around it."""

    __slots__ = ("content", "id", "special", "lstrip", "rstrip")

    def __init__(self, content: str, id: int, special: bool = True, lstrip: bool = False, rstrip: bool = False):
        self.content, self.id, self.special, self.lstrip, self.rstrip = content, id, special, lstrip, rstrip

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "content": self.content, "single_word": False, "lstrip": self.lstrip,
                "rstrip": self.rstrip, "normalized": False, "special": self.special}


def trim_offsets(token: str, start: int, end: int, keep_one_leading: bool) -> tuple[int, int]:
    """The `tokenizers` ByteLevel offset trimming: leading and trailing spaces are not part of a token's span.
    keep_one_leading: the token is its text's first and starts with the one space add_prefix_space added.
    >>> trim_offsets("Ġworld", 5, 11, False)
    (6, 11)
    """
    lead = 0
    for c in token:
        if c != _SPACE_CHAR and c not in _WHITESPACE:
            break
        lead += 1
    trail = 0
    for c in reversed(token):
        if c != _SPACE_CHAR and c not in _WHITESPACE:
            break
        trail += 1
    if lead and not (keep_one_leading and lead == 1):
        start = min(start + lead, end)
    if trail and end >= trail:
        end = max(end - trail, start)
    return start, end


class RobertaTokenizer(PairEncoderMixin):
    """Byte-level BPE with RoBERTa's/BART's added tokens and template (see the module docstring)."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 added_tokens: Sequence[AddedToken] = (), add_prefix_space: bool = False, trim_offsets: bool = True,
                 use_regex: bool = True, model_max_length: int = 512, clean_up_tokenization_spaces: bool = False,
                 template: dict[str, list] | None = None, **special_names: str):
        unknown = [k for k in special_names if k not in SPECIAL_NAMES]
        if unknown:
            raise TokenizerError(f"unknown tokenizer option {unknown[0]!r}")
        names = {**DEFAULTS, **special_names}
        self.vocab = dict(vocab)
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        added = {t.content: t for t in added_tokens}
        for name in SPECIAL_NAMES:  # the named special tokens are added tokens even when a file forgot to say so
            tok = names[name]
            if tok in self.vocab and tok not in added:
                added[tok] = AddedToken(tok, self.vocab[tok], lstrip=name == "mask_token")
        for t in added.values():
            self.vocab.setdefault(t.content, t.id)
            self.inv_vocab.setdefault(t.id, t.content)
        self.added = added
        for name in ("bos_token", "eos_token", "pad_token", "cls_token", "sep_token"):
            if names[name] not in self.vocab:
                raise TokenizerError(f"{name} {names[name]!r} is not in the vocabulary")
        for name in SPECIAL_NAMES:
            setattr(self, name, names[name])
        self.add_prefix_space, self.trim, self.use_regex = bool(add_prefix_space), bool(trim_offsets), use_regex
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # the BPE itself: GPT-2's merges over the byte alphabet (lmforge.tokenizers.bpe)
        try:
            byte_vocab = {i: unicode_to_token(t) for t, i in vocab.items() if t not in added}
            byte_merges = [(unicode_to_token(a), unicode_to_token(b)) for a, b in merges]
        except KeyError:
            raise TokenizerError("not a byte-level BPE vocabulary: a token has a character outside GPT-2's byte "
                                 "alphabet") from None
        self.bpe = Tokenizer(byte_vocab, byte_merges, GPT2_PATTERN, use_fast=False)
        self.merges = list(merges)
        self._pretokenize = regex.compile(GPT2_PATTERN)
        # added tokens are found longest first ("</s>" before a shorter token that is its prefix)
        self._added_re = regex.compile("|".join(regex.escape(c) for c in sorted(added, key=len, reverse=True))) \
            if added else None
        self.template = template or roberta_template(self.cls_token, self.sep_token)
        for part in (self.template["single"], self.template["pair"]):
            for item in part:
                if item[0] == "special" and item[1] not in self.vocab:
                    raise TokenizerError(f"the template's special token {item[1]!r} is not in the vocabulary")

    # ---- ids of the special tokens --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self.inv_vocab) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"RobertaTokenizer(vocab_size={self.vocab_size}, add_prefix_space={self.add_prefix_space})"

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, i: int) -> str:
        if i not in self.inv_vocab:
            raise TokenizerError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
        return self.inv_vocab[i]

    def _id(self, name: str) -> int | None:
        return self.vocab.get(getattr(self, name))

    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    cls_token_id = property(lambda self: self._id("cls_token"))
    sep_token_id = property(lambda self: self._id("sep_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    mask_token_id = property(lambda self: self._id("mask_token"))

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(t.id for t in self.added.values() if t.special)

    # ---- steps 1-4: added tokens, prefix space, pre-tokens, BPE ------------------------------------------------
    def _split_added(self, text: str) -> list[tuple[int, int, AddedToken | None]]:
        """[(start, end, added token or None)]: the text cut around added tokens. An lstrip token's span takes
        in the whitespace before it (that whitespace is no longer text to tokenize), an rstrip token's the
        whitespace after it."""
        if self._added_re is None:
            return [(0, len(text), None)]
        out, last = [], 0
        for m in self._added_re.finditer(text):
            tok = self.added[m.group()]
            s, e = m.start(), m.end()
            if s < last:  # inside the whitespace an rstrip token already took
                continue
            if tok.lstrip:
                while s > last and text[s - 1] in _WHITESPACE:
                    s -= 1
            if tok.rstrip:
                while e < len(text) and text[e] in _WHITESPACE:
                    e += 1
            if s > last:
                out.append((last, s, None))
            out.append((s, e, tok))
            last = e
        if last < len(text):
            out.append((last, len(text), None))
        return out

    def _encode_text(self, text: str) -> Encoding:
        """Steps 1-4 for one text: ids, token strings ("Ġworld"), character offsets, word ids."""
        ids, tokens, offsets, words = [], [], [], []
        word = -1
        for start, end, added in self._split_added(text):
            if added is not None:  # its token is the text it took (" <mask>"), trimmed like any token
                word += 1
                first = (not offsets or start == 0) and self.add_prefix_space
                span = trim_offsets(text[start:end], start, end, first) if self.trim else (start, end)
                ids.append(added.id); tokens.append(text[start:end])  # noqa: E702
                offsets.append(span); words.append(word)  # noqa: E702
                continue
            piece = text[start:end]
            prefixed = self.add_prefix_space and not piece.startswith(" ")
            if prefixed:
                piece = " " + piece
            spans = self._pretokenize.finditer(piece) if self.use_regex else [_Whole(piece)]
            for m in spans:
                word += 1
                chars = m.group()
                byte_char = []  # for each byte of this pre-token: (first char, end char) in the original text
                for k, c in enumerate(chars, start=m.start()):
                    if prefixed and k == 0:  # the added space shares the span of the piece's first character
                        span = (start, start + 1)
                    else:
                        orig = start + k - (1 if prefixed else 0)
                        span = (orig, orig + 1)
                    byte_char.extend([span] * len(c.encode("utf-8")))
                pos = 0
                for i in self.bpe.encode_piece(chars.encode("utf-8")):
                    n = len(self.bpe.vocab[i])
                    s, e = byte_char[pos][0], byte_char[pos + n - 1][1]
                    pos += n
                    tok = self.inv_vocab[i]
                    if self.trim:
                        is_first = not offsets or s == 0
                        s, e = trim_offsets(tok, s, e, keep_one_leading=is_first and self.add_prefix_space)
                    ids.append(i); tokens.append(tok); offsets.append((s, e)); words.append(word)  # noqa: E702
        return Encoding(ids, tokens, offsets, words)

    def _encode_words(self, texts: Sequence[str], fast: bool | None = None) -> list[Encoding]:
        return [self._encode_text(t) for t in texts]

    # ---- step 5: the template (truncation and padding: PairEncoderMixin) ---------------------------------------
    def _post_process(self, a: Encoding, b: Encoding | None, add_special_tokens: bool) -> Encoding:
        """<s> A </s>  or  <s> A </s></s> B </s> (the template's specials; token types as it says, RoBERTa: 0)."""
        if not add_special_tokens:
            parts = [("seq", 0, 0)] + ([("seq", 1, 0)] if b is not None else [])
        else:
            parts = self.template["pair" if b is not None else "single"]
        ids, tokens, offsets, word_ids, seq_ids, type_ids = [], [], [], [], [], []
        for item in parts:
            if item[0] == "special":
                ids.append(self.vocab[item[1]]); tokens.append(item[1]); offsets.append((0, 0))  # noqa: E702
                word_ids.append(None); seq_ids.append(None); type_ids.append(item[2])  # noqa: E702
            else:
                e = a if item[1] == 0 else b
                ids.extend(e.ids); tokens.extend(e.tokens); offsets.extend(e.offsets)  # noqa: E702
                word_ids.extend(e.word_ids); seq_ids.extend([item[1]] * len(e))  # noqa: E702
                type_ids.extend([item[2]] * len(e))
        n_trunc = a.num_truncated + (b.num_truncated if b is not None else 0)
        return Encoding(ids, tokens, offsets, word_ids, seq_ids, type_ids, n_trunc)

    def num_special_tokens(self, pair: bool = False) -> int:
        return sum(1 for item in self.template["pair" if pair else "single"] if item[0] == "special")

    # ---- decoding ---------------------------------------------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = True) -> bytes:
        """The bytes of the tokens; an added token stands for its own text (unless skipped, when special)."""
        out = []
        for i in ids:
            i = int(i)
            tok = self.id_to_token(i)
            added = self.added.get(tok)
            if added is not None and added.id == i:
                if not (skip_special_tokens and added.special):
                    out.append(tok.encode("utf-8"))
            else:
                out.append(self.bpe.vocab[i])
        return b"".join(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text: the bytes joined and read as UTF-8 (a cut character becomes U+FFFD), as the ByteLevel
        decoder does. [0, 31414, 232, 2] -> "Hello world" (special tokens skipped) with roberta-base's files."""
        text = self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")
        if self.clean_up_tokenization_spaces:  # transformers' old default: " ." -> "." and the like
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    # ---- files ------------------------------------------------------------------------------------------------
    @classmethod
    def from_tokenizer_json(cls, data: dict[str, Any], config: dict[str, Any] | None = None,
                            source: str = "tokenizer.json") -> "RobertaTokenizer":
        """A Hugging Face tokenizer.json with a ByteLevel pre-tokenizer and a BPE model (RoBERTa, BART)."""
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{source}: model type {model.get('type')!r} is not BPE")
        if data.get("normalizer"):
            raise TokenizerError(f"{source}: a normalizer ({(data['normalizer'] or {}).get('type')}) is not "
                                 "supported for RoBERTa-style byte-level BPE")
        if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
                or model.get("byte_fallback"):
            raise TokenizerError(f"{source}: BPE options (dropout, subword prefix/suffix, byte fallback) that "
                                 "RoBERTa's byte-level BPE does not use")
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel":
            raise TokenizerError(f"{source}: pre_tokenizer {pre.get('type')!r} is not ByteLevel")
        vocab, merges_raw = model.get("vocab"), model.get("merges") or []
        if not isinstance(vocab, dict) or not vocab:
            raise TokenizerError(f"{source}: BPE model has no vocab")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges_raw]
        added = []
        for t in data.get("added_tokens") or []:
            if t.get("single_word"):
                raise TokenizerError(f"{source}: added token {t.get('content')!r} is single_word, which is not "
                                     "supported")
            added.append(AddedToken(t["content"], int(t["id"]), bool(t.get("special")), bool(t.get("lstrip")),
                                    bool(t.get("rstrip"))))
        config = config or {}
        opts = _config_options(config)
        opts["add_prefix_space"] = bool(pre.get("add_prefix_space", False))
        opts["use_regex"] = bool(pre.get("use_regex", True))
        post = data.get("post_processor") or {}
        opts["template"] = _template_from_post(post, source)
        # offsets are trimmed by RobertaProcessing (a TemplateProcessing leaves them as they are)
        opts["trim_offsets"] = post.get("type") == "RobertaProcessing" and bool(post.get("trim_offsets", True))
        if post.get("type") == "RobertaProcessing":
            opts["cls_token"], opts["sep_token"] = post["cls"][0], post["sep"][0]
        return cls(vocab, merges, added_tokens=added, **opts)

    @classmethod
    def from_vocab_merges(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike,
                          config: dict[str, Any] | None = None) -> "RobertaTokenizer":
        """The older pair of files: vocab.json (token -> id) and merges.txt ("#version" line, then "a b" per
        line), with tokenizer_config.json's options. `<mask>` eats the space before it (lstrip), as
        transformers' RobertaTokenizerFast and BartTokenizerFast set it, unless the config's
        added_tokens_decoder says otherwise."""
        try:
            vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
            lines = Path(merges_file).read_text(encoding="utf-8").split("\n")
        except FileNotFoundError as e:
            raise TokenizerError(f"{e.filename}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{vocab_file}: not a JSON vocabulary ({e})") from None
        if not isinstance(vocab, dict) or not vocab:
            raise TokenizerError(f"{vocab_file}: expected a JSON object of token -> id")
        merges = []
        for n, line in enumerate(lines):
            if line.startswith("#version") or not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{merges_file}:{n + 1}: a merge is two tokens separated by one space")
            merges.append((parts[0], parts[1]))
        config = config or {}
        opts = _config_options(config)
        opts["add_prefix_space"] = bool(config.get("add_prefix_space", False))
        opts["trim_offsets"] = bool(config.get("trim_offsets", True))
        added = []
        for i, t in (config.get("added_tokens_decoder") or {}).items():
            added.append(AddedToken(t["content"], int(i), bool(t.get("special", True)), bool(t.get("lstrip")),
                                    bool(t.get("rstrip"))))
        return cls(vocab, merges, added_tokens=added, **opts)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike,
                        n_merges: int | None = None, **kwargs: Any) -> "RobertaTokenizer":
        """RoBERTa's layout over OpenAI's GPT-2 files (encoder.json, vocab.bpe): `<s> <pad> </s> <unk>` first,
        GPT-2's tokens after them (without <|endoftext|>), `<mask>` last. n_merges keeps the 256 bytes and the
        first n merges: a small vocabulary for a small model. (roberta-base's own ids are GPT-2's tokens in
        fairseq's frequency order; this keeps GPT-2's order.)"""
        enc = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        merges = merges[:n_merges] if n_merges is not None else merges
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for t, i in sorted(enc.items(), key=lambda kv: kv[1]):
            if t != "<|endoftext|>" and i < 256 + len(merges):
                vocab[t] = len(vocab)
        vocab["<mask>"] = len(vocab)
        return cls(vocab, merges, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RobertaTokenizer":
        """A directory: tokenizer.json if there is one, else vocab.json + merges.txt; tokenizer_config.json for
        the special tokens' names, model_max_length and (with the file pair) add_prefix_space."""
        d = Path(path)
        config: dict[str, Any] = {}
        if (d / "tokenizer_config.json").exists():
            try:
                config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{d / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        if (d / "tokenizer.json").exists():
            try:
                data = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{d / 'tokenizer.json'}: not valid JSON ({e})") from None
            return cls.from_tokenizer_json(data, config, source=str(d / "tokenizer.json"))
        if (d / "vocab.json").exists() and (d / "merges.txt").exists():
            return cls.from_vocab_merges(d / "vocab.json", d / "merges.txt", config)
        raise TokenizerError(f"{d}: no tokenizer.json, and no vocab.json + merges.txt pair")

    def to_hf_dict(self) -> dict[str, Any]:
        """This tokenizer as a Hugging Face tokenizer.json (RoBERTa's layout; loads in `tokenizers`)."""
        post = {"type": "RobertaProcessing", "sep": [self.sep_token, self.sep_token_id],
                "cls": [self.cls_token, self.cls_token_id], "trim_offsets": self.trim,
                "add_prefix_space": self.add_prefix_space}
        if self.template != roberta_template(self.cls_token, self.sep_token):
            post = _template_to_post(self.template, self.vocab)
        byte_level = {"type": "ByteLevel", "add_prefix_space": self.add_prefix_space, "trim_offsets": self.trim,
                      "use_regex": self.use_regex}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [t.to_dict() for t in sorted(self.added.values(), key=lambda t: t.id)],
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": post,
            "decoder": {**byte_level, "add_prefix_space": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
                      "merges": [list(m) for m in self.merges]},
        }

    def tokenizer_config(self) -> dict[str, Any]:
        cfg = {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": self.add_prefix_space,
               "trim_offsets": self.trim, "model_max_length": self.model_max_length,
               "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces, "errors": "replace"}
        cfg.update({name: getattr(self, name) for name in SPECIAL_NAMES})
        cfg["added_tokens_decoder"] = {str(t.id): {k: v for k, v in t.to_dict().items() if k != "id"}
                                       for t in sorted(self.added.values(), key=lambda t: t.id)}
        return cfg

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_write(d / "tokenizer.json") as f:
            json.dump(self.to_hf_dict(), f, ensure_ascii=False)
        with atomic_write(d / "vocab.json") as f:
            json.dump(dict(sorted(self.vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False)
        with atomic_write(d / "merges.txt") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        atomic_write_json(d / "tokenizer_config.json", self.tokenizer_config())
        atomic_write_json(d / "special_tokens_map.json", {name: getattr(self, name) for name in SPECIAL_NAMES})
        return d


class _Whole:
    """A stand-in regex match covering a whole piece (ByteLevel with use_regex=False: no pre-tokenization)."""

    def __init__(self, s: str):
        self._s = s

    def group(self) -> str:
        return self._s

    def start(self) -> int:
        return 0


# ----------------------------------------------------------------------------------------------------------------
# Templates and options
# ----------------------------------------------------------------------------------------------------------------
def roberta_template(cls_token: str, sep_token: str) -> dict[str, list]:
    """RobertaProcessing as a template: items ("special", token, type_id) or ("seq", 0|1, type_id)."""
    return {"single": [("special", cls_token, 0), ("seq", 0, 0), ("special", sep_token, 0)],
            "pair": [("special", cls_token, 0), ("seq", 0, 0), ("special", sep_token, 0),
                     ("special", sep_token, 0), ("seq", 1, 0), ("special", sep_token, 0)]}


def _template_from_post(post: dict[str, Any], source: str) -> dict[str, list] | None:
    kind = post.get("type")
    if kind in (None, "RobertaProcessing"):
        return roberta_template(post["cls"][0], post["sep"][0]) if kind else None
    if kind == "TemplateProcessing":
        out = {}
        for key in ("single", "pair"):
            items = []
            for p in post.get(key) or []:
                if "SpecialToken" in p:
                    items.append(("special", p["SpecialToken"]["id"], int(p["SpecialToken"].get("type_id", 0))))
                else:
                    items.append(("seq", 0 if p["Sequence"]["id"] == "A" else 1, int(p["Sequence"].get("type_id", 0))))
            out[key] = items
        return out
    raise TokenizerError(f"{source}: post_processor {kind!r} is not supported (RobertaProcessing or "
                         "TemplateProcessing)")


def _template_to_post(template: dict[str, list], vocab: dict[str, int]) -> dict[str, Any]:
    def items(part):
        return [{"SpecialToken": {"id": x[1], "type_id": x[2]}} if x[0] == "special"
                else {"Sequence": {"id": "AB"[x[1]], "type_id": x[2]}} for x in part]

    specials = {x[1] for part in template.values() for x in part if x[0] == "special"}
    return {"type": "TemplateProcessing", "single": items(template["single"]), "pair": items(template["pair"]),
            "special_tokens": {s: {"id": s, "ids": [vocab[s]], "tokens": [s]} for s in sorted(specials)}}


def _token_name(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _config_options(config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json -> constructor options: special token names, model_max_length, decode clean-up."""
    opts: dict[str, Any] = {}
    for name in SPECIAL_NAMES:
        v = _token_name(config.get(name))
        if v is not None:
            opts[name] = v
    mml = config.get("model_max_length")
    if isinstance(mml, int) and 0 < mml < 10**9:
        opts["model_max_length"] = mml
    if "clean_up_tokenization_spaces" in config:
        opts["clean_up_tokenization_spaces"] = bool(config["clean_up_tokenization_spaces"])
    return opts


def is_roberta_tokenizer_dir(d: str | os.PathLike) -> bool:
    """True when a directory's tokenizer is byte-level BPE (tokenizer.json with a ByteLevel pre-tokenizer, or
    vocab.json + merges.txt without a tokenizer.json)."""
    d = Path(d)
    if (d / "tokenizer.json").exists():
        try:
            data = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and (data.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
    return (d / "vocab.json").exists() and (d / "merges.txt").exists()
