"""WordPiece: BERT's tokenizer, from `vocab.txt` or a Hugging Face `tokenizer.json`, with ids equal to HF's.

BPE (GPT-2) builds words up from bytes by merging frequent pairs. WordPiece (Schuster & Nakajima 2012; BERT,
Devlin et al. 2018) goes the other way at encoding time: it cuts each word into the *longest* pieces found in a
fixed vocabulary, left to right. Pieces that continue a word carry a `##` prefix, so "unaffable" becomes
`un ##aff ##able`, and a word with no possible cut becomes one `[UNK]`.

Encoding a text takes four steps (the same four components a tokenizer.json names):

    1. normalize (BertNormalizer)   drop control chars, whitespace -> " ", spaces around CJK ideographs,
                                    strip accents (NFD, drop combining marks), lower-case   "Héllo!" -> "hello!"
    2. pre-tokenize (BertPreTokenizer)  split on whitespace, and every punctuation char on its own
                                    "hello, world!" -> ["hello", ",", "world", "!"]
    3. model (WordPiece)            greedy longest-match-first per word, "##" continuation, [UNK] for words that
                                    cannot be cut or are longer than 100 chars   "playing" -> ["play", "##ing"]
    4. post-process (Template)      [CLS] A [SEP]  or  [CLS] A [SEP] B [SEP], token_type_ids 0 for A, 1 for B

Special tokens written in the text ("Paris is the [MASK] of France.") are matched before normalization, as
Hugging Face does, so fill-mask prompts work as typed.

Every token keeps the character span it came from in the original text (`offset_mapping`) and the index of the
word it belongs to (`word_ids`): NER aligns word labels to pieces with them, QA maps a predicted token span back to
characters.

Truncation (`truncation=True` / "longest_first" / "only_first" / "only_second") follows the `tokenizers` library's
rules exactly (`_truncate_pair`); how many tokens each input lost is reported in `BatchEncoding.num_truncated`.

Two paths, one result. `fast=False` runs the readable Python below. `fast=True` (the default when the `tokenizers`
library is installed) runs steps 1-3 in the `tokenizers` library built from the same vocabulary and settings (Rust,
many texts at once), then the same Python step 4, truncation and padding. tests/test_wordpiece.py checks that both
paths give the same ids, offsets and word ids, and that both equal `BertTokenizerFast`.

    tok = WordPieceTokenizer.load("path/to/model-dir")          # tokenizer.json, else vocab.txt
    tok("Hello world!")["input_ids"]                              # [101, 7592, 2088, 999, 102]
    batch = tok(["a question", "another"], ["its passage", "b"], padding=True, truncation="only_second",
                max_length=64, return_tensors="pt")
    batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch.word_ids(0), batch.num_truncated
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmforge.errors import TokenizerError
from lmforge.tokenizers.encoding import BatchEncoding, Encoding, PairEncoderMixin, truncate_pair  # noqa: F401
from lmforge.utils import atomic_write, atomic_write_json

# Rust's char::is_whitespace (the Unicode White_Space property), which the `tokenizers` library uses.
_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                        "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
SPECIAL_NAMES = ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token")


# ----------------------------------------------------------------------------------------------------------------
# Character classes (pure functions)
# ----------------------------------------------------------------------------------------------------------------
def is_whitespace(c: str) -> bool:
    """' ', '\\t', '\\n', '\\u3000' ... -> True."""
    return c in _WHITESPACE


def is_control(c: str) -> bool:
    """Control/format/unassigned chars (category C*), except tab and newlines, which count as whitespace."""
    if c in "\t\n\r":
        return False
    return unicodedata.category(c).startswith("C")


def is_punctuation(c: str) -> bool:
    """ASCII punctuation ('$', '^', '`' included, which Unicode files as symbols) or any Unicode P* char."""
    return (c.isascii() and not c.isalnum() and c.isprintable() and c != " ") or unicodedata.category(c).startswith("P")


def is_cjk(c: str) -> bool:
    """CJK ideographs get spaces around them: Chinese has no spaces, so each character is its own word."""
    cp = ord(c)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------
class WordPieceTokenizer(PairEncoderMixin):
    """BERT's WordPiece tokenizer (see the module docstring). `encode`, `encode_batch`, `tok(...)`, `pad` and
    truncation come from `lmforge.tokenizers.encoding.PairEncoderMixin`."""

    def __init__(self, vocab: dict[str, int], *, lowercase: bool = True, strip_accents: bool | None = None,
                 handle_chinese_chars: bool = True, clean_text: bool = True, unk_token: str = "[UNK]",
                 cls_token: str = "[CLS]", sep_token: str = "[SEP]", pad_token: str = "[PAD]",
                 mask_token: str = "[MASK]", prefix: str = "##", max_input_chars_per_word: int = 100,
                 model_max_length: int = 512, fast: bool | None = None):
        if not vocab:
            raise TokenizerError("a WordPiece vocabulary cannot be empty")
        self.vocab = dict(vocab)
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.lowercase, self.handle_chinese_chars, self.clean_text = lowercase, handle_chinese_chars, clean_text
        self.strip_accents = strip_accents  # None: follow lowercase (BERT's rule)
        self.unk_token, self.cls_token, self.sep_token = unk_token, cls_token, sep_token
        self.pad_token, self.mask_token = pad_token, mask_token
        for name in ("unk_token", "cls_token", "sep_token", "pad_token"):
            if getattr(self, name) not in self.vocab:
                raise TokenizerError(f"{name} {getattr(self, name)!r} is not in the WordPiece vocabulary")
        self.prefix, self.max_input_chars_per_word = prefix, max_input_chars_per_word
        self.model_max_length = model_max_length
        # special tokens are matched in the raw text, longest first ("[MASK]" typed in a prompt is the mask token)
        self.special_tokens = sorted({t for t in (unk_token, cls_token, sep_token, pad_token, mask_token)
                                      if t in self.vocab}, key=len, reverse=True)
        self._fast_tok = None
        if fast is None:
            try:
                import tokenizers  # noqa: F401
                fast = True
            except ImportError:
                fast = False
        self.fast = fast

    # ---- ids of the special tokens --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, i: int) -> str:
        if i not in self.inv_vocab:
            raise TokenizerError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
        return self.inv_vocab[i]

    @property
    def cls_token_id(self) -> int:
        return self.vocab[self.cls_token]

    @property
    def sep_token_id(self) -> int:
        return self.vocab[self.sep_token]

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self.vocab[self.unk_token]

    @property
    def mask_token_id(self) -> int | None:
        return self.vocab.get(self.mask_token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.vocab[t] for t in self.special_tokens)

    # ---- step 1: normalize, keeping where each character came from ------------------------------------------
    def normalize(self, text: str) -> tuple[str, list[int]]:
        """(normalized text, for each of its chars the index of the original char it came from).

        "Héllo\\tW!" -> ("hello w!", [0, 1, 2, 3, 4, 5, 6, 7]): é decomposes to e + U+0301 and the accent is
        dropped; a CJK ideograph becomes three chars (space, itself, space) that all map back to it.
        """
        strip = self.lowercase if self.strip_accents is None else self.strip_accents
        out: list[str] = []
        src: list[int] = []
        for i, c in enumerate(text):
            if self.clean_text:
                if c == "\x00" or c == "\ufffd" or is_control(c):
                    continue
                if is_whitespace(c):
                    c = " "
            pieces = c
            if strip:
                pieces = "".join(ch for ch in unicodedata.normalize("NFD", pieces) if unicodedata.category(ch) != "Mn")
            if self.lowercase:
                pieces = pieces.lower()
            if self.handle_chinese_chars and is_cjk(c):
                pieces = " " + pieces + " "
            out.append(pieces)
            src.extend([i] * len(pieces))
        return "".join(out), src

    # ---- step 2: split into words ---------------------------------------------------------------------------
    @staticmethod
    def pre_tokenize(text: str) -> list[tuple[int, int]]:
        """Word spans of a normalized text: whitespace separates, each punctuation char is its own word.

        "hello, world!" -> [(0, 5), (5, 6), (7, 12), (12, 13)]
        """
        spans: list[tuple[int, int]] = []
        start = None
        for i, c in enumerate(text):
            if is_whitespace(c) or is_punctuation(c):
                if start is not None:
                    spans.append((start, i))
                    start = None
                if not is_whitespace(c):
                    spans.append((i, i + 1))
            elif start is None:
                start = i
        if start is not None:
            spans.append((start, len(text)))
        return spans

    # ---- step 3: cut a word into pieces ---------------------------------------------------------------------
    def wordpiece(self, word: str) -> list[tuple[str, int, int]]:
        """Greedy longest-match-first: (piece, start, end) within the word, or one [UNK] for the whole word.

        "unaffable" -> [("un", 0, 2), ("##aff", 2, 5), ("##able", 5, 9)] with BERT's vocabulary.
        """
        if len(word) > self.max_input_chars_per_word:
            return [(self.unk_token, 0, len(word))]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:  # the longest vocabulary entry that starts here
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    pieces.append((piece, start, end))
                    break
                end -= 1
            else:  # nothing matched, not even one character: the whole word is unknown
                return [(self.unk_token, 0, len(word))]
            start = end
        return pieces

    def _split_specials(self, text: str) -> list[tuple[str, int, bool]]:
        """[(chunk, start, is_special)]: special tokens typed in the text are cut out before normalization."""
        chunks, i, last = [], 0, 0
        while i < len(text):
            hit = next((s for s in self.special_tokens if text.startswith(s, i)), None)
            if hit:
                if last < i:
                    chunks.append((text[last:i], last, False))
                chunks.append((hit, i, True))
                i = last = i + len(hit)
            else:
                i += 1
        if last < len(text):
            chunks.append((text[last:], last, False))
        return chunks

    def _encode_words_py(self, text: str) -> Encoding:
        """Steps 1-3 in Python: the pieces of one text, with character offsets and word ids."""
        ids, tokens, offsets, word_ids = [], [], [], []
        word = -1
        for chunk, base, special in self._split_specials(text):
            if special:
                word += 1
                ids.append(self.vocab[chunk]); tokens.append(chunk)  # noqa: E702
                offsets.append((base, base + len(chunk))); word_ids.append(word)  # noqa: E702
                continue
            norm, src = self.normalize(chunk)
            for ws, we in self.pre_tokenize(norm):
                word += 1
                for piece, ps, pe in self.wordpiece(norm[ws:we]):
                    ids.append(self.vocab[piece]); tokens.append(piece)  # noqa: E702
                    offsets.append((base + src[ws + ps], base + src[ws + pe - 1] + 1))
                    word_ids.append(word)
        return Encoding(ids, tokens, offsets, word_ids)

    # ---- the same steps 1-3 in the `tokenizers` library (fast path) ------------------------------------------
    def _backend(self):
        """A `tokenizers.Tokenizer` with exactly this vocabulary and these settings (steps 1-3 only)."""
        if self._fast_tok is None:
            from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

            t = Tokenizer(models.WordPiece(self.vocab, unk_token=self.unk_token,
                                           continuing_subword_prefix=self.prefix,
                                           max_input_chars_per_word=self.max_input_chars_per_word))
            t.normalizer = normalizers.BertNormalizer(clean_text=self.clean_text,
                                                      handle_chinese_chars=self.handle_chinese_chars,
                                                      strip_accents=self.strip_accents, lowercase=self.lowercase)
            t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            t.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in self.special_tokens])
            self._fast_tok = t
        return self._fast_tok

    def _encode_words(self, texts: Sequence[str], fast: bool | None = None) -> list[Encoding]:
        fast = self.fast if fast is None else fast
        if not fast:
            return [self._encode_words_py(t) for t in texts]
        encs = self._backend().encode_batch(list(texts), add_special_tokens=False)
        out = []
        for e in encs:
            out.append(Encoding(list(e.ids), list(e.tokens), [tuple(o) for o in e.offsets], list(e.word_ids)))
        return out

    # ---- step 4: specials (truncation and padding: PairEncoderMixin) -----------------------------------------
    def _post_process(self, a: Encoding, b: Encoding | None, add_special_tokens: bool) -> Encoding:
        """[CLS] A [SEP] (B [SEP]): token types 0 up to the first [SEP], 1 after it."""
        cls_, sep = ([(self.cls_token_id, self.cls_token)], [(self.sep_token_id, self.sep_token)]) \
            if add_special_tokens else ([], [])
        ids, tokens, offsets, word_ids, seq_ids, type_ids = [], [], [], [], [], []

        def add_special(parts, type_id):
            for i, t in parts:
                ids.append(i); tokens.append(t); offsets.append((0, 0))  # noqa: E702
                word_ids.append(None); seq_ids.append(None); type_ids.append(type_id)  # noqa: E702

        def add_seq(e: Encoding, seq: int):
            ids.extend(e.ids); tokens.extend(e.tokens); offsets.extend(e.offsets)  # noqa: E702
            word_ids.extend(e.word_ids); seq_ids.extend([seq] * len(e)); type_ids.extend([seq] * len(e))  # noqa: E702

        add_special(cls_, 0)
        add_seq(a, 0)
        add_special(sep, 0)
        if b is not None:
            add_seq(b, 1)
            add_special(sep, 1)
        n_trunc = a.num_truncated + (b.num_truncated if b is not None else 0)
        return Encoding(ids, tokens, offsets, word_ids, seq_ids, type_ids, n_trunc)

    def num_special_tokens(self, pair: bool = False) -> int:
        return 3 if pair else 2

    # ---- decoding ---------------------------------------------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The `tokenizers` WordPiece decoder: a piece gets a leading space unless it continues a word ("##"),
        then each piece alone gets the clean-up (" ." -> "."), so "don ' t" stays as HF prints it:
        [101, 7592, 1010, 2088, 999, 102] -> "hello, world!"."""
        specials = set(self.all_special_ids) if skip_special_tokens else set()
        toks = [self.id_to_token(int(i)) for i in ids if int(i) not in specials]
        out = []
        for i, tok in enumerate(toks):
            if i:
                tok = tok[len(self.prefix):] if tok.startswith(self.prefix) else " " + tok
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                tok = tok.replace(a, b)
            out.append(tok)
        return "".join(out)

    # ---- files ------------------------------------------------------------------------------------------------
    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike, **kwargs: Any) -> "WordPieceTokenizer":
        """BERT's original vocab.txt: one token per line, the line number is its id."""
        try:
            lines = Path(path).read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise TokenizerError(f"{path}: file not found") from None
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: not a UTF-8 text file") from None
        if lines and lines[-1] == "":
            lines.pop()
        vocab: dict[str, int] = {}
        for i, tok in enumerate(lines):
            vocab.setdefault(tok.rstrip("\r"), i)
        if not vocab:
            raise TokenizerError(f"{path}: empty vocabulary")
        return cls(vocab, **kwargs)

    @classmethod
    def from_tokenizer_json(cls, data: dict[str, Any] | str | os.PathLike, **kwargs: Any) -> "WordPieceTokenizer":
        """A Hugging Face tokenizer.json with a BertNormalizer, BertPreTokenizer and WordPiece model."""
        source = "tokenizer.json"
        if not isinstance(data, dict):
            source = str(data)
            try:
                data = json.loads(Path(data).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise TokenizerError(f"{source}: file not found") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{source}: not valid JSON ({e})") from None
        model = data.get("model") or {}
        if model.get("type") != "WordPiece":
            raise TokenizerError(f"{source}: model type {model.get('type')!r} is not WordPiece")
        norm = data.get("normalizer") or {}
        if norm and norm.get("type") != "BertNormalizer":
            raise TokenizerError(f"{source}: normalizer {norm.get('type')!r} is not supported (BertNormalizer only)")
        pre = data.get("pre_tokenizer") or {}
        if pre and pre.get("type") != "BertPreTokenizer":
            raise TokenizerError(f"{source}: pre_tokenizer {pre.get('type')!r} is not supported "
                                 "(BertPreTokenizer only)")
        opts: dict[str, Any] = dict(
            lowercase=norm.get("lowercase", True), strip_accents=norm.get("strip_accents"),
            handle_chinese_chars=norm.get("handle_chinese_chars", True), clean_text=norm.get("clean_text", True),
            unk_token=model.get("unk_token", "[UNK]"), prefix=model.get("continuing_subword_prefix", "##"),
            max_input_chars_per_word=model.get("max_input_chars_per_word", 100))
        post = data.get("post_processor") or {}
        if post.get("type") == "TemplateProcessing":
            single = [p for p in post.get("single", [])]
            specials = [p["SpecialToken"]["id"] for p in single if "SpecialToken" in p]
            if len(specials) == 2:
                opts["cls_token"], opts["sep_token"] = specials
        elif post.get("type") == "BertProcessing":
            opts["sep_token"], opts["cls_token"] = post["sep"][0], post["cls"][0]
        pad = data.get("padding") or {}
        if pad.get("pad_token"):
            opts["pad_token"] = pad["pad_token"]
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not vocab:
            raise TokenizerError(f"{source}: WordPiece model has no vocab")
        opts.update(kwargs)
        return cls(vocab, **opts)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> "WordPieceTokenizer":
        """A directory (tokenizer.json preferred, else vocab.txt; tokenizer_config.json for special tokens,
        do_lower_case and model_max_length) or a tokenizer.json / vocab.txt file."""
        p = Path(path)
        d = p if p.is_dir() else p.parent
        cfg: dict[str, Any] = {}
        if (d / "tokenizer_config.json").exists():
            try:
                cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{d / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        opts: dict[str, Any] = {}
        mml = cfg.get("model_max_length")
        if isinstance(mml, int) and 0 < mml < 10**9:
            opts["model_max_length"] = mml
        for name in ("mask_token",):  # not named by tokenizer.json's components
            if isinstance(cfg.get(name), str):
                opts[name] = cfg[name]
        if p.is_file() and p.suffix == ".json" or p.is_dir() and (d / "tokenizer.json").exists():
            opts.update(kwargs)
            return cls.from_tokenizer_json(p if p.is_file() else d / "tokenizer.json", **opts)
        vocab_file = p if p.is_file() else d / "vocab.txt"
        if not vocab_file.exists():
            raise TokenizerError(f"{d}: no tokenizer.json or vocab.txt")
        for name in SPECIAL_NAMES:
            if isinstance(cfg.get(name), str):
                opts[name] = cfg[name]
        if "do_lower_case" in cfg:
            opts["lowercase"] = bool(cfg["do_lower_case"])
        if "strip_accents" in cfg:
            opts["strip_accents"] = cfg["strip_accents"]
        if "tokenize_chinese_chars" in cfg:
            opts["handle_chinese_chars"] = bool(cfg["tokenize_chinese_chars"])
        opts.update(kwargs)
        return cls.from_vocab_file(vocab_file, **opts)

    def to_hf_dict(self) -> dict[str, Any]:
        """This tokenizer as a Hugging Face tokenizer.json (loads in `tokenizers` and `BertTokenizerFast`)."""
        added = [{"id": self.vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for t in sorted(self.special_tokens, key=self.vocab.get)]
        cls_id, sep_id = self.cls_token_id, self.sep_token_id
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "BertNormalizer", "clean_text": self.clean_text,
                           "handle_chinese_chars": self.handle_chinese_chars, "strip_accents": self.strip_accents,
                           "lowercase": self.lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": self.cls_token, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": self.sep_token, "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": self.cls_token, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": self.sep_token, "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}},
                         {"SpecialToken": {"id": self.sep_token, "type_id": 1}}],
                "special_tokens": {self.cls_token: {"id": self.cls_token, "ids": [cls_id], "tokens": [self.cls_token]},
                                   self.sep_token: {"id": self.sep_token, "ids": [sep_id], "tokens": [self.sep_token]}},
            },
            "decoder": {"type": "WordPiece", "prefix": self.prefix, "cleanup": True},
            "model": {"type": "WordPiece", "unk_token": self.unk_token, "continuing_subword_prefix": self.prefix,
                      "max_input_chars_per_word": self.max_input_chars_per_word, "vocab": self.vocab},
        }

    def tokenizer_config(self) -> dict[str, Any]:
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
               "strip_accents": self.strip_accents, "tokenize_chinese_chars": self.handle_chinese_chars,
               "model_max_length": self.model_max_length}
        cfg.update({name: getattr(self, name) for name in SPECIAL_NAMES})
        return cfg

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json, vocab.txt and tokenizer_config.json into a directory (each file atomically)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_write(d / "tokenizer.json") as f:
            json.dump(self.to_hf_dict(), f, ensure_ascii=False)
        with atomic_write(d / "vocab.txt") as f:
            f.write("".join(self.inv_vocab[i] + "\n" for i in sorted(self.inv_vocab)))
        atomic_write_json(d / "tokenizer_config.json", self.tokenizer_config())
        atomic_write_json(d / "special_tokens_map.json", {name: getattr(self, name) for name in SPECIAL_NAMES})
        return d
