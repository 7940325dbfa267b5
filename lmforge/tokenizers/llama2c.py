"""llama2.c's tokenizer `.bin`: SentencePiece scores driving a BPE, behind lmforge's tokenizer interface.

The tokenizer file (`tok512.bin`, `tokenizer.bin`): int32 max_token_length, then per token a float32 score, an
int32 byte length and the raw bytes. Ids 0/1/2 are `<unk>`, BOS, EOS; 3..258 are byte-fallback tokens `<0x00>`..
`<0xFF>`; pieces use a plain space where SentencePiece shows `▁`. Encoding (llama2.c's `encode`): a leading `" "`
token (SentencePiece's dummy prefix), then one token per UTF-8 character (unknown characters become their bytes,
id = byte + 3), then repeatedly merge the adjacent pair whose concatenation is a token with the highest score. This
is BPE driven by scores instead of merge ranks. The model file that goes with it is read by
`lmforge.formats.llama2c`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmforge.tokenizers.batch import BatchCallMixin
from lmforge.errors import TokenizerError

# ----------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------
class Llama2cTokenizer(BatchCallMixin):
    """llama2.c's SentencePiece-score BPE tokenizer, behind lmforge's tokenizer interface.

    `encode` never adds BOS (lmforge's rule); `add_bos_token` is True because the model was trained with it.
    `vocab` maps ids to the bytes they decode to (`<0x0A>` -> b"\\n"; BOS/EOS/UNK -> "<s>", "</s>", "<unk>").
    """

    kind = "llama2c"
    UNK, BOS, EOS = 0, 1, 2

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], max_token_length: int = 0):
        if len(pieces) != len(scores) or len(pieces) < 259:
            raise TokenizerError(f"llama2.c tokenizer needs >= 259 tokens (3 specials + 256 bytes), got {len(pieces)}")
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [float(s) for s in scores]
        self.max_token_length = max_token_length
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._lookup.setdefault(p, i)
        if b" " not in self._lookup:
            raise TokenizerError("llama2.c tokenizer has no ' ' token (needed for the dummy prefix)")
        self.special_tokens = {"<unk>": self.UNK, "<s>": self.BOS, "</s>": self.EOS}
        self.bos_token_id, self.eos_token_id, self.pad_token_id = self.BOS, self.EOS, None
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = "<s>", "</s>", None, "<unk>"
        self.add_bos_token = True
        self.chat_template = None
        self.added_tokens: dict[str, int] = {}
        self.merges: list[tuple[bytes, bytes]] = []
        self.pattern = None
        self._vocab = {}
        for i, p in enumerate(self.pieces):
            if i in (self.UNK, self.BOS, self.EOS):
                self._vocab[i] = {0: b"<unk>", 1: b"<s>", 2: b"</s>"}[i]
            elif 3 <= i < 259 and p == f"<0x{i - 3:02X}>".encode():
                self._vocab[i] = bytes([i - 3])
            else:
                self._vocab[i] = p

    # ---- files ------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Llama2cTokenizer":
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TokenizerError(f"{path}: file not found") from None
        if len(data) < 4:
            raise TokenizerError(f"{path}: too short for a llama2.c tokenizer")
        (max_len,) = struct.unpack_from("<i", data, 0)
        pieces, scores, off = [], [], 4
        while off < len(data):
            if off + 8 > len(data):
                raise TokenizerError(f"{path}: truncated at token {len(pieces)}")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise TokenizerError(f"{path}: truncated or corrupt at token {len(pieces)} (length {n})")
            pieces.append(data[off:off + n])
            scores.append(score)
            off += n
        return cls(pieces, scores, max_len)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the llama2.c `.bin` format (a directory gets `tokenizer.bin`)."""
        from lmforge.utils import atomic_write_bytes

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.bin"
        out = [struct.pack("<i", max(self.max_token_length, max(len(p) for p in self.pieces)))]
        for p, s in zip(self.pieces, self.scores):
            out.append(struct.pack("<fi", s, len(p)) + p)
        atomic_write_bytes(path, b"".join(out))
        return path

    def to_hf_dict(self) -> dict[str, Any]:
        """This tokenizer as a Hugging Face tokenizer.json (the SentencePiece-BPE layout of Llama 2's).

        Spaces become "▁" and one is prepended (the dummy prefix); the BPE model has byte fallback. HF's BPE applies
        merges by rank, llama2.c by the score of the merged token, so the merges are every (left, right) split of
        each token into two tokens, ordered by that token's score: the same choice at every step.
        """
        def piece(i: int) -> str:
            if i in (self.UNK, self.BOS, self.EOS):
                return {0: "<unk>", 1: "<s>", 2: "</s>"}[i]
            return self.pieces[i].decode("utf-8", errors="replace").replace(" ", "\u2581")

        vocab = {piece(i): i for i in range(self.vocab_size)}
        ordinary = {p: i for p, i in self._lookup.items() if i >= 259}
        merges = []
        for merged, i in sorted(ordinary.items(), key=lambda kv: (-self.scores[kv[1]], kv[1])):
            for k in range(1, len(merged)):
                a, b = merged[:k], merged[k:]
                if a in ordinary and b in ordinary:
                    merges.append((self.scores[i], i, ordinary[a], ordinary[b]))
        merges.sort(key=lambda m: (-m[0], m[1], m[2]))
        special = [{"id": i, "content": piece(i), "single_word": False, "lstrip": False, "rstrip": False,
                    "normalized": False, "special": True} for i in (self.UNK, self.BOS, self.EOS)]
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
            "pre_tokenizer": None,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [self.BOS], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": [[piece(a), piece(b)] for _, _, a, b in merges]},
        }

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json for `transformers.AutoTokenizer` (BOS added, as Llama 2's tokenizer does)."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                "clean_up_tokenization_spaces": False, "legacy": True,
                "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                                  "single_word": False, "special": True}
                                         for i, c in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))}}

    # ---- basics -------------------------------------------------------------------------------------------------
    @property
    def vocab(self) -> dict[int, bytes]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Llama2cTokenizer(vocab_size={self.vocab_size})"

    def token_to_id(self, token: str | bytes) -> int | None:
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        return self._lookup.get(token.encode() if isinstance(token, str) else token)

    def id_to_token(self, i: int) -> bytes:
        return self._vocab[i]

    # ---- encoding -----------------------------------------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        """llama2.c's `encode` without BOS/EOS: dummy prefix, characters (or their bytes), best-score merges."""
        if not text:
            return []
        ids = [self._lookup[b" "]]
        for ch in text:
            b = ch.encode("utf-8")
            i = self._lookup.get(b)
            if i is not None:
                ids.append(i)
            else:
                ids.extend(x + 3 for x in b)  # byte fallback: <0xNN> has id NN + 3
        pieces = self.pieces
        while True:
            best_score, best_id, best_idx = -1e10, -1, -1
            for k in range(len(ids) - 1):
                j = self._lookup.get(pieces[ids[k]] + pieces[ids[k + 1]])
                if j is not None and self.scores[j] > best_score:
                    best_score, best_id, best_idx = self.scores[j], j, k
            if best_idx == -1:
                return ids
            ids[best_idx:best_idx + 2] = [best_id]

    def encode(self, text: str, *, allowed_special: Any = frozenset(), disallowed_special: Any = "all",
               **_: Any) -> list[int]:
        """Token ids of `text` (never BOS/EOS). Special-token text follows tiktoken's allowed/disallowed rules."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = (set(self.special_tokens) - allowed) if disallowed_special == "all" else set(disallowed_special)
        for s in disallowed:
            if s in text:
                raise TokenizerError(f"text contains the special token {s!r}; pass allowed_special={{{s!r}}} to "
                                     "encode it as one id, or disallowed_special=() to encode it as text")
        present = [s for s in allowed if s in text]
        if not present:
            return self._encode_plain(text)
        import regex

        pat = regex.compile("|".join(regex.escape(s) for s in sorted(present, key=len, reverse=True)))
        out, start = [], 0
        for m in pat.finditer(text):
            out.extend(self._encode_plain(text[start:m.start()]))
            out.append(self.special_tokens[m.group()])
            start = m.end()
        out.extend(self._encode_plain(text[start:]))
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encode_plain(text)

    def encode_batch(self, texts: Sequence[str], **kwargs: Any) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    # ---- decoding -----------------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of the tokens. As in SentencePiece (and llama2.c after BOS), the dummy-prefix space at the start
        of the text is dropped; BOS/EOS decode to nothing."""
        out, at_start = [], True
        for i in ids:
            i = int(i)
            if i not in self._vocab:
                raise TokenizerError(f"token id {i!r} is not in the vocabulary (size {self.vocab_size})")
            if i in (self.BOS, self.EOS):
                at_start = i == self.BOS or at_start
                continue
            piece = self._vocab[i]
            if at_start and piece.startswith(b" "):
                piece = piece[1:]
            at_start = False
            out.append(piece)
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
