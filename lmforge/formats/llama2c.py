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

import numpy as np
import torch

from lmforge.models.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.formats.native import Loaded, build_model, check_tensors, resolve_device, resolve_dtype
from lmforge.generation.config import GenerationConfig
from lmforge.tokenizers.llama2c import Llama2cTokenizer

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
    """The parts of an `LM` from a llama2.c `.bin` model and its tokenizer `.bin` (found beside the model when not given)."""
    path = Path(path)
    config, sd = read_llama2c_model(path)

    def state_fn(expected):
        check_tensors(sd, expected, str(path))
        return sd

    model = build_model(config, state_fn, dtype=resolve_dtype(dtype, "float32"), device=resolve_device(device))
    tok_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(path, config.vocab_size)
    tok = Llama2cTokenizer.load(tok_path) if tok_path is not None else None
    if tok is not None and tok.vocab_size != config.vocab_size:
        raise CheckpointError(f"{tok_path}: tokenizer has {tok.vocab_size} tokens but {path.name} expects "
                              f"{config.vocab_size}")
    gen = GenerationConfig(bos_token_id=1, eos_token_id=2)
    return Loaded(model, tok, config, gen, None, path=str(path))
