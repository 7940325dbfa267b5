"""llama2.c checkpoints: Karpathy's legacy `.bin` model files and their SentencePiece-score tokenizer `.bin`.

llama2.c (github.com/karpathy/llama2.c) runs Llama-architecture models from a flat binary file. Its "legacy"
(version 0) format is:

    7 x int32 header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
                      (vocab_size > 0: the output classifier is tied to the token embedding; < 0: it is stored)
    float32 arrays, each Linear as [out, in]:
        tok_embeddings [V, dim]     rms_att [L, dim]    wq [L, dim, dim]   wk [L, kv_dim, dim]  wv [L, kv_dim, dim]
        wo [L, dim, dim]            rms_ffn [L, dim]    w1 [L, hidden, dim] w2 [L, dim, hidden] w3 [L, hidden, dim]
        rms_final [dim]             freq_cis_real, freq_cis_imag [seq_len, head_size/2] (unused)
        wcls [V, dim]               (only when vocab_size < 0)

It is exactly lmforge's Llama configuration (RMSNorm eps 1e-5, SwiGLU `w2(silu(w1 x) * w3 x)`, RoPE theta 10000)
with one difference in how RoPE pairs coordinates. Meta's code (and llama2.c) rotates *adjacent* pairs
`(2i, 2i+1)` of each head; Hugging Face (and lmforge) rotate `(i, i + hd/2)` ("rotate half"). Attention scores
only depend on dot products q.k within a head, so any permutation applied to the rows of both wq and wk gives the
same model; we apply the one that moves row 2i to position i and row 2i+1 to position i + hd/2:

    w.view(n_head, hd/2, 2, dim).transpose(1, 2).reshape(n_head*hd, dim)      (the `permute` of HF's converter)

The tokenizer file (`tok512.bin`, `tokenizer.bin`): int32 max_token_length, then per token a float32 score, an
int32 byte length and the raw bytes. Ids 0/1/2 are `<unk>`, BOS, EOS; 3..258 are byte-fallback tokens `<0x00>`..
`<0xFF>`; pieces use a plain space where SentencePiece shows `▁`. Encoding (llama2.c's `encode`): a leading `" "`
token (SentencePiece's dummy prefix), then one token per UTF-8 character (unknown characters become their bytes,
id = byte + 3), then repeatedly merge the adjacent pair whose concatenation is a token with the highest score. This
is BPE driven by scores instead of merge ranks.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from lmforge.models.config import ModelConfig
from lmforge.errors import CheckpointError, TokenizerError

LEGACY_HEADER = struct.Struct("<7i")
V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export formats (version 1 fp32, version 2 int8)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
def meta_to_hf_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's adjacent-pair RoPE layout to the rotate-half layout. (n_head*hd, C)"""
    out_dim, in_dim = w.shape
    hd = out_dim // n_head
    return w.view(n_head, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `meta_to_hf_rope`."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_head
    return w.reshape(n_head, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def read_llama2c_model(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and lmforge-named fp32 state dict of a legacy llama2.c `.bin` (q/k rows already permuted)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(LEGACY_HEADER.size)
    if len(head) < LEGACY_HEADER.size:
        raise CheckpointError(f"{path}: too short for a llama2.c header ({size} bytes)")
    if struct.unpack("<I", head[:4])[0] == V1_MAGIC:
        raise CheckpointError(f"{path}: llama2.c export version 1/2 (magic ak42) is not supported; "
                              "re-export with --version 0 (legacy)")
    dim, hidden, n_layer, n_head, n_kv_head, vocab, seq_len = LEGACY_HEADER.unpack(head)
    if min(dim, hidden, n_layer, n_head, n_kv_head, seq_len) <= 0 or vocab == 0 or dim % n_head or \
            n_head % n_kv_head:
        raise CheckpointError(f"{path}: not a llama2.c model (header dim={dim} hidden={hidden} layers={n_layer} "
                              f"heads={n_head} kv_heads={n_kv_head} vocab={vocab} seq_len={seq_len})")
    tied, V = vocab > 0, abs(vocab)
    hd = dim // n_head
    kv_dim = n_kv_head * hd
    L = n_layer
    shapes = [("tok_embeddings", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv_dim, dim)),
              ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)),
              ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
              ("freq_cis_real", (seq_len, hd // 2)), ("freq_cis_imag", (seq_len, hd // 2))]
    if not tied:
        shapes.append(("wcls", (V, dim)))
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    expected = LEGACY_HEADER.size + 4 * n_floats
    if size != expected:
        what = "truncated" if size < expected else "has trailing data"
        raise CheckpointError(f"{path}: {what}: the header implies {expected} bytes, the file has {size}")
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=LEGACY_HEADER.size).copy())
    arrays, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = flat[off:off + n].view(shape)
        off += n

    config = ModelConfig(vocab_size=V, block_size=seq_len, n_layer=L, n_head=n_head, n_kv_head=n_kv_head,
                         n_embd=dim, intermediate_size=hidden, pos_embedding="rope", rope_theta=10000.0,
                         norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", qkv_bias=False, o_bias=False, mlp_bias=False,
                         tie_word_embeddings=tied, name=path.stem)
    sd = {"wte.weight": arrays["tok_embeddings"], "norm_f.weight": arrays["rms_final"]}
    for i in range(L):
        p = f"blocks.{i}."
        sd[p + "norm_1.weight"] = arrays["rms_att"][i]
        sd[p + "attn.q_proj.weight"] = meta_to_hf_rope(arrays["wq"][i], n_head)
        sd[p + "attn.k_proj.weight"] = meta_to_hf_rope(arrays["wk"][i], n_kv_head)
        sd[p + "attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "norm_2.weight"] = arrays["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    if not tied:
        sd["lm_head.weight"] = arrays["wcls"]
    return config, {k: v.contiguous() for k, v in sd.items()}


def find_tokenizer(model_path: Path, vocab_size: int) -> Path | None:
    """llama2.c's conventions: `tokenizer.bin` or `tok<vocab>.bin` next to the model."""
    for name in (f"tok{vocab_size}.bin", "tokenizer.bin"):
        if (model_path.parent / name).exists():
            return model_path.parent / name
    return None


def load_llama2c(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, dtype="auto", device=None):
    """An `LM` from a llama2.c `.bin` model and its tokenizer `.bin` (found beside the model when not given)."""
    from lmforge.formats.native import _resolve_device, _resolve_dtype, build_model, check_tensors
    from lmforge.lm import LM, GenerationConfig

    path = Path(path)
    config, sd = read_llama2c_model(path)

    def state_fn(expected):
        check_tensors(sd, expected, str(path))
        return sd

    model = build_model(config, state_fn, dtype=_resolve_dtype(dtype, "float32"), device=_resolve_device(device))
    tok_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(path, config.vocab_size)
    tok = Llama2cTokenizer.load(tok_path) if tok_path is not None else None
    if tok is not None and tok.vocab_size != config.vocab_size:
        raise CheckpointError(f"{tok_path}: tokenizer has {tok.vocab_size} tokens but {path.name} expects "
                              f"{config.vocab_size}")
    gen = GenerationConfig(bos_token_id=1, eos_token_id=2)
    return LM(model, tok, config, gen, None, path=str(path))


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------
class Llama2cTokenizer:
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
