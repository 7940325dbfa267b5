"""GGUF: llama.cpp's single-file model format — export an lmforge model to it, and import one back.

What a GGUF file is
-------------------
One file holding everything an inference engine needs: a header, a typed key-value store (architecture
hyper-parameters under `<arch>.*`, the whole tokenizer under `tokenizer.ggml.*`, the chat template), then a table
of tensors with their names, shapes and types, then the aligned tensor data (memory-mappable). Tensor names are
llama.cpp's canonical ones (`token_embd`, `blk.3.attn_q`, `output_norm`), whatever the training code called them.
We write it with the `gguf` package (`GGUFWriter`, `gguf.quants`): llama.cpp's own Python writer, so the byte
layout, alignment and block quantization are exactly what llama.cpp reads.

Tensor types
------------
- f32 / f16: plain floats.
- q8_0: blocks of 32 weights, one fp16 scale `d = max|w| / 127` per block and 32 int8s: 8.5 bits per weight.
- q4_0: blocks of 32, one fp16 scale and 32 4-bit codes `q = round(w / d) + 8` in [0, 15] (`d = max / -8`, where
  `max` is the signed value of largest magnitude): 4.5 bits per weight.
  Like lmforge's int4 these are group-wise with 32-wide groups; 1-D tensors (norms, biases) always stay f32, and
  a matrix whose rows are not a multiple of 32 stays f16 (as llama.cpp's own converter does).

Two things the conversion must get right
----------------------------------------
1. RoPE layout. lmforge (like Hugging Face) rotates the pairs (i, i + hd/2) of each head ("rotate half");
   llama.cpp's `llama` architecture rotates adjacent pairs (2i, 2i+1), Meta's original layout. Rotating the
   rows of W_q and W_k (`hf_to_meta_rope`) turns one into the other without changing q·k, so logits are identical.
2. The tokenizer. A GPT-2 style byte-level BPE is stored as `tokenizer.ggml.model = "gpt2"`: tokens written in
   GPT-2's byte-to-unicode alphabet, the merges in order, and `tokenizer.ggml.pre` naming the pre-tokenizer
   regex ("gpt-2", or "llama-bpe" for the GPT-4/Llama-3 pattern). A llama2.c / SentencePiece vocabulary is
   `"llama"`: pieces with "▁" for spaces, a score per piece (merge priority) and a type per token (normal,
   control, byte fallback `<0x0A>`, unknown).

Supported: the `llama` family (RoPE, RMSNorm, SwiGLU, no biases, optional GQA, tied or untied head) and the `gpt2`
family (learned positions, LayerNorm, GELU, biases; q/k/v fused into `attn_qkv` as llama.cpp expects).

Mixture of experts (Mixtral) is llama.cpp's `llama` architecture too, with `llama.expert_count` (E) and
`llama.expert_used_count` (k) set and, per layer, the router and the experts stacked into 3-D tensors:

    blk.{i}.ffn_gate_inp.weight    (E, C)       the router
    blk.{i}.ffn_gate_exps.weight   (E, He, C)   every expert's gate_proj, expert j at [j]
    blk.{i}.ffn_up_exps.weight     (E, He, C)
    blk.{i}.ffn_down_exps.weight   (E, C, He)

(numpy shapes; ggml lists them innermost first). llama.cpp's `llama` MoE renormalizes the top-k weights, so only
`norm_topk_prob=True` models without a shared expert (Mixtral's block) are written this way. Qwen2-MoE's block (q/k/v
biases, raw top-k weights, a shared expert with a sigmoid gate) is llama.cpp's `qwen2moe` architecture: the same
expert tensors plus `ffn_gate_inp_shexp` (C,) and `ffn_{gate,up,down}_shexp`, widths in
`qwen2moe.expert_feed_forward_length` / `expert_shared_feed_forward_length`. qwen2moe rotates halves (NeoX RoPE),
lmforge's own layout, so its q/k rows are written as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats.llama2c import hf_to_meta_rope, meta_to_hf_rope
from lmforge.formats.native import build_model, check_tensors, Loaded
from lmforge.generation.config import GenerationConfig
from lmforge.models.config import ModelConfig
from lmforge.tokenizers.bpe import pattern_name
from lmforge.utils import check_parents, parse_device, parse_dtype

GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # q8_0 / q4_0 block size


def _gguf():
    import gguf

    return gguf


# ----------------------------------------------------------------------------------------------------------------
# Which architecture
# ----------------------------------------------------------------------------------------------------------------
def gguf_arch(config: ModelConfig) -> str:
    """'llama', 'qwen2moe' or 'gpt2' for a config llama.cpp runs under that architecture, else a one-line
    ConfigError."""
    c = config
    rope_family = (c.pos_embedding == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu" and not c.o_bias
                   and not c.mlp_bias and not c.sliding_window and not c.rope_scaling
                   and c.head_dim * c.n_head == c.n_embd)
    if c.num_experts and c.shared_expert_intermediate_size:
        if rope_family and c.qkv_bias and not c.norm_topk_prob:
            return "qwen2moe"
        raise ConfigError("GGUF export of a mixture of experts with a shared expert is llama.cpp's qwen2moe: "
                          "Qwen2-MoE's block with q/k/v biases and norm_topk_prob=False (llama.cpp does not "
                          f"renormalize); this model has qkv_bias={c.qkv_bias}, norm_topk_prob={c.norm_topk_prob}")
    if c.num_experts and not c.norm_topk_prob:
        raise ConfigError("GGUF export of a mixture of experts without a shared expert is llama.cpp's llama "
                          "(Mixtral's block), which renormalizes the top-k weights: this model has "
                          "norm_topk_prob=False")
    if (c.pos_embedding == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu" and not c.qkv_bias
            and not c.o_bias and not c.mlp_bias and not c.sliding_window and not c.rope_scaling
            and c.head_dim * c.n_head == c.n_embd):
        return "llama"
    if (c.pos_embedding == "learned" and c.norm == "layernorm" and c.mlp == "gelu" and c.qkv_bias and c.o_bias
            and c.mlp_bias and not c.sliding_window and c.n_kv_head == c.n_head and c.head_dim * c.n_head == c.n_embd):
        return "gpt2"
    raise ConfigError(f"GGUF export supports the llama and gpt2 architectures; this model "
                      f"({c.name or 'unnamed'}: pos_embedding={c.pos_embedding}, norm={c.norm}, mlp={c.mlp}, "
                      f"qkv_bias={c.qkv_bias}, sliding_window={c.sliding_window}, rope_scaling="
                      f"{(c.rope_scaling or {}).get('rope_type')}) is neither")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------
def _pre_name(pattern: str | None) -> str:
    name = pattern_name(pattern) if pattern else "custom"
    if name == "gpt2":
        return "gpt-2"
    if name in ("gpt4", "cl100k", "llama3"):
        return "llama-bpe"  # llama.cpp's name for the cl100k / Llama-3 regex
    raise ConfigError("GGUF export: the tokenizer's pre-tokenization regex is not one llama.cpp knows "
                      "(use the gpt2, gpt4 or llama3 pattern)")


def _write_tokenizer(w, tok, n_vocab: int) -> None:
    gguf = _gguf()
    T = gguf.TokenType
    kind = getattr(tok, "kind", None)
    if kind == "llama2c":  # SentencePiece-style: pieces + scores + token types
        tokens, scores, types = [], [], []
        for i, piece in enumerate(tok.pieces):
            if i == tok.UNK:
                tokens.append("<unk>"), types.append(T.UNKNOWN)
            elif i in (tok.BOS, tok.EOS):
                tokens.append("<s>" if i == tok.BOS else "</s>"), types.append(T.CONTROL)
            elif 3 <= i < 259 and piece == f"<0x{i - 3:02X}>".encode():
                tokens.append(piece.decode()), types.append(T.BYTE)
            else:
                tokens.append(piece.decode("utf-8", errors="replace").replace(" ", "\u2581")), types.append(T.NORMAL)
            scores.append(float(tok.scores[i]))
        if len(tokens) > n_vocab:
            raise ConfigError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}")
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]"), scores.append(-1e4), types.append(T.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(tok.UNK)
        w.add_add_space_prefix(True)  # llama2.c puts a " " token first, as SentencePiece's dummy prefix
    elif kind == "bpe" or hasattr(tok, "merges") and getattr(tok, "merges", None):
        from lmforge.tokenizers.bpe import token_to_unicode

        named = {i: s for s, i in {**getattr(tok, "added_tokens", {}), **tok.special_tokens}.items()}
        size = max(tok.vocab_size, n_vocab)
        if tok.vocab_size > n_vocab:
            raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {n_vocab}")
        tokens, types = [], []
        vocab = tok.vocab
        for i in range(size):
            if i in named:
                tokens.append(named[i]), types.append(T.CONTROL if named[i] in tok.special_tokens else T.USER_DEFINED)
            elif i in vocab:
                tokens.append(token_to_unicode(vocab[i])), types.append(T.NORMAL)
            else:
                tokens.append(f"[PAD{i}]"), types.append(T.UNUSED)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_name(getattr(tok, "pattern", None)))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges([f"{token_to_unicode(a)} {token_to_unicode(b)}" for a, b in tok.merges])
    else:
        raise ConfigError(f"GGUF export: unsupported tokenizer kind {kind!r} (byte-level BPE or llama2.c only)")
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    if getattr(tok, "pad_token_id", None) is not None:
        w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    w.add_add_eos_token(False)


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
def _weight(model: torch.nn.Module, name: str) -> np.ndarray:
    """A module's float weight as numpy fp32, row-major (quantized lmforge modules are dequantized; a weight
    re-laid out for decoding, see `DecodeWeights`, is copied back to (out, in) rows)."""
    return model.get_submodule(name).weight.detach().float().cpu().contiguous().numpy()


def _bias(model: torch.nn.Module, name: str) -> np.ndarray:
    return model.get_submodule(name).bias.detach().float().cpu().contiguous().numpy()


def gguf_tensors(model: torch.nn.Module, config: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """lmforge weights under llama.cpp's tensor names (fp32 numpy, numpy shape = (out, in))."""
    gguf = _gguf()
    N, tn = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    out: dict[str, np.ndarray] = {tn[N.TOKEN_EMBD] + ".weight": _weight(model, "wte")}
    if arch == "gpt2":
        out[tn[N.POS_EMBD] + ".weight"] = _weight(model, "wpe")
    for i in range(config.n_layer):
        p = f"blocks.{i}."

        def name(t, suffix="weight"):
            return tn[t].format(bid=i) + "." + suffix

        out[name(N.ATTN_NORM)] = _weight(model, p + "norm_1")
        out[name(N.FFN_NORM)] = _weight(model, p + "norm_2")
        if arch in ("llama", "qwen2moe"):
            q, k = _weight(model, p + "attn.q_proj"), _weight(model, p + "attn.k_proj")
            if arch == "llama":  # adjacent-pair RoPE: permute the rows (qwen2moe rotates halves, as lmforge does)
                q = hf_to_meta_rope(torch.from_numpy(q), config.n_head).numpy()
                k = hf_to_meta_rope(torch.from_numpy(k), config.n_kv_head).numpy()
            out[name(N.ATTN_Q)], out[name(N.ATTN_K)] = q, k
            out[name(N.ATTN_V)] = _weight(model, p + "attn.v_proj")
            if config.qkv_bias:
                for t, x in ((N.ATTN_Q, "q"), (N.ATTN_K, "k"), (N.ATTN_V, "v")):
                    out[name(t, "bias")] = _bias(model, f"{p}attn.{x}_proj")
            out[name(N.ATTN_OUT)] = _weight(model, p + "attn.o_proj")
            if config.num_experts:  # the router, and each matrix of every expert stacked: (E, out, in)
                experts = range(config.num_experts)
                out[name(N.FFN_GATE_INP)] = _weight(model, p + "mlp.router")
                for t, proj in ((N.FFN_GATE_EXP, "gate_proj"), (N.FFN_UP_EXP, "up_proj"),
                                (N.FFN_DOWN_EXP, "down_proj")):
                    out[name(t)] = np.stack([_weight(model, f"{p}mlp.experts.{j}.{proj}") for j in experts])
                if config.shared_expert_intermediate_size:  # its gate is one row: stored as a (C,) vector
                    out[name(N.FFN_GATE_INP_SHEXP)] = _weight(model, p + "mlp.shared_expert_gate").reshape(-1)
                    for t, proj in ((N.FFN_GATE_SHEXP, "gate_proj"), (N.FFN_UP_SHEXP, "up_proj"),
                                    (N.FFN_DOWN_SHEXP, "down_proj")):
                        out[name(t)] = _weight(model, f"{p}mlp.shared_expert.{proj}")
            else:
                out[name(N.FFN_GATE)] = _weight(model, p + "mlp.gate_proj")
                out[name(N.FFN_UP)] = _weight(model, p + "mlp.up_proj")
                out[name(N.FFN_DOWN)] = _weight(model, p + "mlp.down_proj")
        else:
            out[name(N.ATTN_NORM, "bias")] = _bias(model, p + "norm_1")
            out[name(N.FFN_NORM, "bias")] = _bias(model, p + "norm_2")
            qkv = [p + f"attn.{x}_proj" for x in "qkv"]
            out[name(N.ATTN_QKV)] = np.concatenate([_weight(model, n) for n in qkv], axis=0)
            out[name(N.ATTN_QKV, "bias")] = np.concatenate([_bias(model, n) for n in qkv], axis=0)
            for t, n in ((N.ATTN_OUT, "attn.o_proj"), (N.FFN_UP, "mlp.up_proj"), (N.FFN_DOWN, "mlp.down_proj")):
                out[name(t)] = _weight(model, p + n)
                out[name(t, "bias")] = _bias(model, p + n)
    out[tn[N.OUTPUT_NORM] + ".weight"] = _weight(model, "norm_f")
    if arch == "gpt2":
        out[tn[N.OUTPUT_NORM] + ".bias"] = _bias(model, "norm_f")
    if arch != "llama" or not config.tie_word_embeddings:  # llama.cpp's llama reuses token_embd when output is absent
        out[tn[N.OUTPUT] + ".weight"] = _weight(model, "lm_head")
    return out


def _encode_tensor(name: str, data: np.ndarray, dtype: str):
    """(array, raw_dtype or None) for GGUFWriter.add_tensor, following llama.cpp's converter's type rules."""
    gguf = _gguf()
    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), None
    if dtype in ("q8_0", "q4_0") and data.shape[-1] % BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0 if dtype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
        return gguf.quants.quantize(data.astype(np.float32), qtype), qtype
    return data.astype(np.float16), None  # f16, or a matrix whose rows do not split into 32-blocks


def export_gguf(lm, path: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write `lm` (model + tokenizer + chat template) as a GGUF file llama.cpp loads. dtype: f32, f16, q8_0, q4_0."""
    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(GGUF_DTYPES)}")
    config: ModelConfig = lm.config
    arch = gguf_arch(config)
    if lm.tokenizer is None:
        raise ConfigError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; a GGUF export is one file (e.g. {path / 'model.gguf'})")

    check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    with torch.no_grad():
        tensors = gguf_tensors(lm.model, config, arch)
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(config.name or path.stem)
        w.add_context_length(config.block_size)
        w.add_embedding_length(config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_feed_forward_length(config.moe_intermediate_size if arch == "llama" and config.num_experts
                                  else config.intermediate_size)
        if config.num_experts:
            w.add_expert_count(config.num_experts)
            w.add_expert_used_count(config.num_experts_per_tok)
        if arch == "qwen2moe":
            w.add_expert_feed_forward_length(config.moe_intermediate_size)
            w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
        w.add_head_count(config.n_head)
        w.add_vocab_size(config.vocab_size)
        if arch in ("llama", "qwen2moe"):
            w.add_head_count_kv(config.n_kv_head)
            w.add_layer_norm_rms_eps(config.norm_eps)
            w.add_rope_freq_base(config.rope_theta)
            w.add_rope_dimension_count(config.head_dim)
        else:
            w.add_layer_norm_eps(config.norm_eps)
        w.add_file_type(file_type)
        if dtype in ("q8_0", "q4_0"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tokenizer(w, lm.tokenizer, config.vocab_size)
        if lm.chat_template:
            w.add_chat_template(lm.chat_template)
        for name, data in tensors.items():
            arr, raw = _encode_tensor(name, data, dtype)
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------------------
def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _tensor_array(t) -> np.ndarray:
    gguf = _gguf()
    shape = tuple(int(x) for x in reversed(t.shape))  # ggml lists dims innermost first
    T = gguf.GGMLQuantizationType
    if t.tensor_type == T.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == T.F16:
        arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    elif t.tensor_type in (T.Q8_0, T.Q4_0):
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    else:
        raise CheckpointError(f"GGUF tensor {t.name!r} has type {t.tensor_type.name}; lmforge reads f32, f16, q8_0 "
                              "and q4_0")
    return arr.reshape(shape)


def _read_tokenizer(reader):
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        return None
    tokens = list(_field(reader, "tokenizer.ggml.tokens", []))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    template = _field(reader, "tokenizer.chat_template")
    if model == "llama":
        from lmforge.tokenizers.llama2c import Llama2cTokenizer

        scores = list(_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
        n = sum(1 for t in types if t != 5)  # drop UNUSED padding
        is_l2c = n >= 259 and tokens[:3] == ["<unk>", "<s>", "</s>"] and all(
            tokens[3 + b] == f"<0x{b:02X}>" for b in range(256))
        if not is_l2c:
            return None
        pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [t.replace("\u2581", " ").encode() for t in tokens[3:n]]
        tok = Llama2cTokenizer(pieces, scores[:n])
        tok.chat_template = template
        return tok
    if model == "gpt2":
        from lmforge.tokenizers.bpe import Tokenizer, unicode_to_token

        pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
        pattern = {"gpt-2": "gpt2", "llama-bpe": "llama3"}.get(pre)
        if pattern is None:
            return None
        vocab, special = {}, {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty in (3, 4, 5):  # control, user-defined, unused: named tokens
                special[t] = i
            else:
                vocab[i] = unicode_to_token(t)
        merges = [tuple(unicode_to_token(x) for x in m.split(" ", 1))
                  for m in _field(reader, "tokenizer.ggml.merges", [])]
        names = {i: s for s, i in special.items()}
        return Tokenizer(vocab, merges, pattern, special, bos_token=names.get(bos), eos_token=names.get(eos),
                         add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                         chat_template=template)
    return None


def load_gguf(path: str | os.PathLike, dtype=None, device=None):
    """Read a GGUF file written for the llama or gpt2 architecture (f32/f16/q8_0/q4_0 tensors) as an `LM`."""
    gguf = _gguf()

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "gpt2", "qwen2moe"):
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (lmforge reads llama, qwen2moe "
                              "and gpt2)")
    tensors = {t.name: t for t in reader.tensors}

    def kv(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    n_vocab = int(tensors["token_embd.weight"].shape[1])
    common = dict(vocab_size=n_vocab, block_size=int(kv("context_length")), n_layer=int(kv("block_count")),
                  n_head=int(kv("attention.head_count")), n_embd=int(kv("embedding_length")),
                  intermediate_size=int(kv("feed_forward_length")), name=str(_field(reader, "general.name", "")))
    arrays = {name: _tensor_array(t) for name, t in tensors.items()}
    n_experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    if n_experts:  # Mixtral's block: every expert feed_forward_length wide, top-k weights renormalized
        common.update(num_experts=n_experts, num_experts_per_tok=int(kv("expert_used_count")), norm_topk_prob=True)
    if arch == "qwen2moe":  # Qwen2-MoE's block: own expert widths, a shared expert, raw top-k weights, q/k/v biases
        common.update(moe_intermediate_size=int(kv("expert_feed_forward_length")), norm_topk_prob=False,
                      shared_expert_intermediate_size=int(kv("expert_shared_feed_forward_length")), qkv_bias=True)
    if arch in ("llama", "qwen2moe"):
        config = ModelConfig(**common, n_kv_head=int(kv("attention.head_count_kv", common["n_head"])),
                             pos_embedding="rope", norm="rmsnorm", mlp="swiglu",
                             rope_theta=float(kv("rope.freq_base", 10000.0)),
                             norm_eps=float(kv("attention.layer_norm_rms_epsilon")),
                             tie_word_embeddings=("output.weight" not in arrays or arch == "qwen2moe" and
                                                  np.array_equal(arrays["output.weight"], arrays["token_embd.weight"])))
    else:
        config = ModelConfig(**common, pos_embedding="learned", norm="layernorm", mlp="gelu", qkv_bias=True,
                             o_bias=True, mlp_bias=True, norm_eps=float(kv("attention.layer_norm_epsilon")),
                             tie_word_embeddings=("output.weight" not in arrays or np.array_equal(
                                 arrays["output.weight"], arrays["token_embd.weight"])))

    def t(name):
        if name not in arrays:
            raise CheckpointError(f"{path}: GGUF tensor {name!r} is missing")
        return torch.from_numpy(np.array(arrays[name], dtype=np.float32, copy=True))

    sd = {"wte.weight": t("token_embd.weight"), "norm_f.weight": t("output_norm.weight")}
    if arch == "gpt2":
        sd["wpe.weight"] = t("position_embd.weight")
        sd["norm_f.bias"] = t("output_norm.bias")
    if not config.tie_word_embeddings:
        sd["lm_head.weight"] = t("output.weight")
    C = config.n_embd
    kv_dim = config.n_kv_head * config.head_dim
    for i in range(config.n_layer):
        b, p = f"blk.{i}.", f"blocks.{i}."
        sd[p + "norm_1.weight"] = t(b + "attn_norm.weight")
        sd[p + "norm_2.weight"] = t(b + "ffn_norm.weight")
        sd[p + "attn.o_proj.weight"] = t(b + "attn_output.weight")
        if n_experts:  # stacked (E, out, in) -> one (out, in) matrix per expert
            sd[p + "mlp.router.weight"] = t(b + "ffn_gate_inp.weight")
            for proj, stacked in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                  ("down_proj", "ffn_down_exps")):
                for j, w in enumerate(t(b + stacked + ".weight")):
                    sd[p + f"mlp.experts.{j}.{proj}.weight"] = w.clone()
        else:
            sd[p + "mlp.up_proj.weight"] = t(b + "ffn_up.weight")
            sd[p + "mlp.down_proj.weight"] = t(b + "ffn_down.weight")
        if arch in ("llama", "qwen2moe"):
            q, k = t(b + "attn_q.weight"), t(b + "attn_k.weight")
            if arch == "llama":  # back from adjacent-pair RoPE rows
                q, k = meta_to_hf_rope(q, config.n_head), meta_to_hf_rope(k, config.n_kv_head)
            sd[p + "attn.q_proj.weight"], sd[p + "attn.k_proj.weight"] = q, k
            sd[p + "attn.v_proj.weight"] = t(b + "attn_v.weight")
            if config.qkv_bias:
                for x in "qkv":
                    sd[p + f"attn.{x}_proj.bias"] = t(b + f"attn_{x}.bias")
            if config.shared_expert_intermediate_size:
                sd[p + "mlp.shared_expert_gate.weight"] = t(b + "ffn_gate_inp_shexp.weight").reshape(1, -1)
                for proj in ("gate", "up", "down"):
                    sd[p + f"mlp.shared_expert.{proj}_proj.weight"] = t(b + f"ffn_{proj}_shexp.weight")
            if not n_experts:
                sd[p + "mlp.gate_proj.weight"] = t(b + "ffn_gate.weight")
        else:
            for x in ("norm_1", "norm_2"):
                sd[p + x + ".bias"] = t(b + ("attn_norm" if x == "norm_1" else "ffn_norm") + ".bias")
            qkv_w, qkv_b = t(b + "attn_qkv.weight"), t(b + "attn_qkv.bias")
            for j, (x, lo, hi) in enumerate((("q", 0, C), ("k", C, C + kv_dim), ("v", C + kv_dim, C + 2 * kv_dim))):
                sd[p + f"attn.{x}_proj.weight"] = qkv_w[lo:hi].clone()
                sd[p + f"attn.{x}_proj.bias"] = qkv_b[lo:hi].clone()
            sd[p + "attn.o_proj.bias"] = t(b + "attn_output.bias")
            sd[p + "mlp.up_proj.bias"] = t(b + "ffn_up.bias")
            sd[p + "mlp.down_proj.bias"] = t(b + "ffn_down.bias")

    def state_fn(expected):
        check_tensors(sd, expected, str(path))
        return {k: v for k, v in sd.items() if k in expected}

    torch_dtype = parse_dtype(dtype) or torch.float32
    dev = torch.device("cpu") if device is None else parse_device(device)
    model = build_model(config, state_fn, dtype=torch_dtype, device=dev)
    tok = _read_tokenizer(reader)
    gen = GenerationConfig(bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
                           eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"))
    return Loaded(model, tok, config, gen, getattr(tok, "chat_template", None) if tok else
              _field(reader, "tokenizer.chat_template"), path=str(path))
