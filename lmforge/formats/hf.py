"""Hugging Face interop: the same weights under two naming schemes.

A Hugging Face checkpoint and an lmforge model hold the same numbers; they differ in three ways:

1. **Config keys.** HF names a field per family (`n_embd` for GPT-2, `hidden_size` for Llama) and changed some
   names between major versions: transformers 4 writes `rope_theta`, `rope_scaling` and `torch_dtype`,
   transformers 5 writes `rope_parameters` (theta and scaling in one dict) and `dtype`. Checkpoints on the Hub carry
   either, so `config_from_hf` reads both and `config_to_hf` writes both.
2. **Tensor names.** One table per family maps each lmforge name to the HF name (`{i}` is the layer index), the way
   gpt-fast's `convert_hf_checkpoint.py` does with a plain dict:

       blocks.{i}.attn.q_proj.weight   <->  model.layers.{i}.self_attn.q_proj.weight          (Llama family)
       blocks.{i}.mlp.up_proj.weight   <->  transformer.h.{i}.mlp.c_fc.weight  (transposed)   (GPT-2)

3. **Layout.** GPT-2 was written with `Conv1D` layers that store weights as `(in, out)`, the transpose of
   `nn.Linear`'s `(out, in)`, and it fuses q, k and v into one `c_attn` matrix of width 3*C. On import we transpose
   and split; on export we fuse and transpose back (nanoGPT's `from_pretrained` does the same).

4. **Experts.** A mixture-of-experts checkpoint on the Hub stores each expert's three matrices as separate tensors
   (`experts.{j}.w1/w2/w3` for Mixtral, `experts.{j}.gate_proj/up_proj/down_proj` for Qwen2-MoE), and that is what
   both transformers 4 and 5 write. transformers 5 holds them in memory fused, one 3-D tensor per layer
   (`experts.gate_up_proj` (E, 2He, C), `experts.down_proj` (E, C, He)); `_split_experts` turns that layout back into
   the per-expert one, so a live transformers-5 model (or a file saved fused) imports too.

RoPE needs no permutation here: lmforge uses HF's rotate-half layout (pairs `(i, i + hd/2)`). Meta's original
checkpoints (and llama2.c) rotate adjacent pairs `(2i, 2i+1)`; `lmforge.formats.llama2c` permutes their q/k rows.

Public functions take objects (dicts, modules), not paths: `lmforge.formats.native` does the file I/O.

    config = config_from_hf(json.load(open("config.json")))
    state = state_dict_from_hf(hf_tensors, config)       # lmforge names, nn.Linear layout
    model = from_hf_model(transformers_model)             # a ready lmforge Transformer (used by tests)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats.native import (build_model, chat_template, generation_config, load_dir_tokenizer, Loaded,
                                    MAX_SHARD_BYTES, read_weights, resolve_device, resolve_dtype, unique_state_dict,
                                    write_safetensors)
from lmforge.models.config import ModelConfig
from lmforge.utils import atomic_dir, atomic_write_json, parse_dtype, read_json

# ----------------------------------------------------------------------------------------------------------------
# Name maps: lmforge name -> Hugging Face name, one dict per family. Only names the model has are used (a Llama
# without attention bias simply has no *.bias parameters).
# ----------------------------------------------------------------------------------------------------------------
LLAMA_NAMES: dict[str, str] = {
    "wte.weight": "model.embed_tokens.weight",
    "blocks.{i}.norm_1.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blocks.{i}.attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blocks.{i}.attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blocks.{i}.attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.attn.o_proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blocks.{i}.norm_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.gate_proj.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blocks.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.up_proj.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blocks.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blocks.{i}.mlp.down_proj.bias": "model.layers.{i}.mlp.down_proj.bias",
    "norm_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# Qwen2 and Mistral checkpoints use Llama's tensor names (Qwen2 adds q/k/v biases, already in the table).
QWEN2_NAMES: dict[str, str] = dict(LLAMA_NAMES)
MISTRAL_NAMES: dict[str, str] = dict(LLAMA_NAMES)

# Mixture-of-experts families: Llama's attention and norms, and per layer a router plus `{j}` = 0..E-1 experts
# (`SparseMoE`). These are the names on the Hub, which transformers 5 still writes (it fuses the experts into 3-D
# tensors only in memory). Mixtral calls the SwiGLU matrices w1 (gate), w3 (up) and w2 (down).
_LLAMA_ATTENTION = {k: v for k, v in LLAMA_NAMES.items() if ".mlp." not in k}
MIXTRAL_NAMES: dict[str, str] = {
    **_LLAMA_ATTENTION,
    "blocks.{i}.mlp.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "blocks.{i}.mlp.experts.{j}.gate_proj.weight": "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
    "blocks.{i}.mlp.experts.{j}.up_proj.weight": "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
    "blocks.{i}.mlp.experts.{j}.down_proj.weight": "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",
}
QWEN2_MOE_NAMES: dict[str, str] = {
    **_LLAMA_ATTENTION,
    "blocks.{i}.mlp.router.weight": "model.layers.{i}.mlp.gate.weight",
    **{f"blocks.{{i}}.mlp.experts.{{j}}.{m}.weight": f"model.layers.{{i}}.mlp.experts.{{j}}.{m}.weight"
       for m in ("gate_proj", "up_proj", "down_proj")},
    **{f"blocks.{{i}}.mlp.shared_expert.{m}.weight": f"model.layers.{{i}}.mlp.shared_expert.{m}.weight"
       for m in ("gate_proj", "up_proj", "down_proj")},
    "blocks.{i}.mlp.shared_expert_gate.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
}

# GPT-2. The q/k/v rows are virtual names: `c_attn` is split into them on import and fused from them on export
# (see `_gpt2_unfuse` / `_gpt2_fuse`); every `c_*` weight is stored transposed (Conv1D).
GPT2_NAMES: dict[str, str] = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "blocks.{i}.norm_1.weight": "transformer.h.{i}.ln_1.weight",
    "blocks.{i}.norm_1.bias": "transformer.h.{i}.ln_1.bias",
    "blocks.{i}.attn.q_proj.weight": "transformer.h.{i}.attn.c_attn.weight#q",
    "blocks.{i}.attn.q_proj.bias": "transformer.h.{i}.attn.c_attn.bias#q",
    "blocks.{i}.attn.k_proj.weight": "transformer.h.{i}.attn.c_attn.weight#k",
    "blocks.{i}.attn.k_proj.bias": "transformer.h.{i}.attn.c_attn.bias#k",
    "blocks.{i}.attn.v_proj.weight": "transformer.h.{i}.attn.c_attn.weight#v",
    "blocks.{i}.attn.v_proj.bias": "transformer.h.{i}.attn.c_attn.bias#v",
    "blocks.{i}.attn.o_proj.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blocks.{i}.attn.o_proj.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blocks.{i}.norm_2.weight": "transformer.h.{i}.ln_2.weight",
    "blocks.{i}.norm_2.bias": "transformer.h.{i}.ln_2.bias",
    "blocks.{i}.mlp.up_proj.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blocks.{i}.mlp.up_proj.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blocks.{i}.mlp.down_proj.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blocks.{i}.mlp.down_proj.bias": "transformer.h.{i}.mlp.c_proj.bias",
    "norm_f.weight": "transformer.ln_f.weight",
    "norm_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}

NAME_MAPS: dict[str, dict[str, str]] = {
    "gpt2": GPT2_NAMES, "llama": LLAMA_NAMES, "qwen2": QWEN2_NAMES, "mistral": MISTRAL_NAMES,
    "mixtral": MIXTRAL_NAMES, "qwen2_moe": QWEN2_MOE_NAMES,
}
ARCHITECTURES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
}
# Tensors some HF checkpoints carry that are not weights: causal-mask buffers (old GPT-2) and cached RoPE
# frequencies (old Llama). They are recomputed from the config, so they are skipped.
IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|\.rotary_emb\.inv_freq$)")


def expand_names(table: Mapping[str, str], n_layer: int, num_experts: int = 0) -> dict[str, str]:
    """The template table for a concrete depth (and expert count, `{j}`):
    {"blocks.{i}.x": "h.{i}.x"} -> {"blocks.0.x": "h.0.x", "blocks.1.x": "h.1.x", ...}."""
    out = {}
    for ours, theirs in table.items():
        layers = range(n_layer) if "{i}" in ours else [0]
        experts = range(num_experts) if "{j}" in ours else [0]
        for i in layers:
            for j in experts:
                out[ours.format(i=i, j=j)] = theirs.format(i=i, j=j)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Config: Hugging Face config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------------------------
def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers-4 keys or transformers-5 `rope_parameters`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form: one shared set here
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"unsupported rope scaling type {kind!r} in config.json; lmforge supports linear and llama3")
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return theta, scaling


def _hf_dtype(hf: Mapping[str, Any]) -> str | None:
    """The checkpoint's dtype: `dtype` (transformers 5) or `torch_dtype` (transformers 4)."""
    d = hf.get("dtype", hf.get("torch_dtype"))
    return str(d).removeprefix("torch.") if d else None


def model_type_of(hf: Mapping[str, Any]) -> str:
    """The family of an HF config ('gpt2', 'llama', 'qwen2', 'mistral'), or a one-line error naming it."""
    mt = hf.get("model_type")
    if mt is None:
        arch = (hf.get("architectures") or [None])[0]
        mt = {v: k for k, v in ARCHITECTURES.items()}.get(arch)
    if mt not in NAME_MAPS:
        arch = (hf.get("architectures") or ["?"])[0]
        raise ConfigError(f"unsupported architecture model_type={mt!r} ({arch}); lmforge reads "
                          f"{', '.join(sorted(NAME_MAPS))}")
    return mt


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face config.json dict (transformers 4 or 5 keys).

    The original dict is kept in `config.extra["hf_config"]` so an export writes back what lmforge does not use
    (token ids, family-specific flags, training dropout). `dropout` is 0 (inference); set `config.dropout` to
    train with dropout.
    """
    mt = model_type_of(hf)
    keep = {k: v for k, v in hf.items() if k not in ("transformers_version", "layer_types")}
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ConfigError(f"GPT-2 activation_function={act!r} is not supported; lmforge uses the tanh GELU")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or \
                hf.get("scale_attn_weights", True) is False:
            raise ConfigError("GPT-2 attention scaling variants (scale_attn_by_inverse_layer_idx, "
                              "reorder_and_upcast_attn, scale_attn_weights=false) are not supported")
        return ModelConfig(
            vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
            intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"], pos_embedding="learned", norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="gelu", qkv_bias=True, o_bias=True,
            mlp_bias=True, tie_word_embeddings=hf.get("tie_word_embeddings", True),
            dropout=0.0, init_std=float(hf.get("initializer_range", 0.02)), name=hf.get("_name_or_path", "") or "",
            extra={"hf_config": keep})
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{mt} hidden_act={act!r} is not supported; lmforge's SwiGLU uses silu")
    theta, scaling = _rope_from_hf(hf)
    n_head = hf["num_attention_heads"]
    moe = _moe_from_hf(hf, mt)
    if mt in ("qwen2", "qwen2_moe"):
        qkv_bias, o_bias, mlp_bias = bool(hf.get("qkv_bias", True)), False, False
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if window and mt == "qwen2_moe":
            raise ConfigError("Qwen2-MoE with use_sliding_window (on alternate layers) is not supported")
        if window and hf.get("max_window_layers", hf["num_hidden_layers"]) < hf["num_hidden_layers"]:
            raise ConfigError("Qwen2 with sliding window on only some layers (max_window_layers) is not supported")
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
        window = hf.get("sliding_window") if mt in ("mistral", "mixtral") else None
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=hf["hidden_size"],
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=hf["intermediate_size"], pos_embedding="rope", rope_theta=theta, rope_scaling=scaling,
        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu", qkv_bias=qkv_bias,
        o_bias=o_bias, mlp_bias=mlp_bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window or None, dropout=0.0, init_std=float(hf.get("initializer_range", 0.02)),
        name=hf.get("_name_or_path", "") or "", extra={"hf_config": keep}, **moe)


def _moe_from_hf(hf: Mapping[str, Any], mt: str) -> dict[str, Any]:
    """The ModelConfig mixture-of-experts fields of a Mixtral or Qwen2-MoE config.json ({} for dense families)."""
    if mt == "mixtral":  # every expert is intermediate_size wide, and the top-k weights are renormalized
        return dict(num_experts=int(hf.get("num_local_experts", 8)),
                    num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
                    moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                    router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    if mt == "qwen2_moe":
        n = hf["num_hidden_layers"]
        step, dense = int(hf.get("decoder_sparse_step", 1)), list(hf.get("mlp_only_layers") or [])
        if step != 1 or dense:
            raise ConfigError(f"Qwen2-MoE with dense MLP layers (decoder_sparse_step={step}, mlp_only_layers="
                              f"{dense}) is not supported; lmforge puts experts in all {n} layers")
        shared = int(hf.get("shared_expert_intermediate_size") or 0)
        if not shared:
            raise ConfigError("Qwen2-MoE without a shared expert (shared_expert_intermediate_size=0) is not supported")
        return dict(num_experts=int(hf.get("num_experts", 60)),
                    num_experts_per_tok=int(hf.get("num_experts_per_tok", 4)),
                    moe_intermediate_size=int(hf["moe_intermediate_size"]),
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)), shared_expert_intermediate_size=shared,
                    router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    return {}


def family_for(config: ModelConfig) -> str:
    """Which HF family can hold this config exactly, or a one-line error saying why none can."""
    orig = (config.extra or {}).get("hf_config", {}).get("model_type")
    if config.num_experts:
        return _moe_family_for(config)
    if config.pos_embedding == "learned":
        problems = []
        if config.norm != "layernorm" or config.mlp != "gelu":
            problems.append("GPT-2 needs layernorm + gelu")
        if config.n_kv_head != config.n_head or config.head_dim * config.n_head != config.n_embd:
            problems.append("GPT-2 needs n_kv_head == n_head and head_dim == n_embd / n_head")
        if not (config.qkv_bias and config.o_bias and config.mlp_bias):
            problems.append("GPT-2 has biases on every linear layer")
        if config.sliding_window:
            problems.append("GPT-2 has no sliding window")
        if problems:
            raise ConfigError(f"cannot export learned-position model as Hugging Face gpt2: {'; '.join(problems)}")
        return "gpt2"
    if config.norm != "rmsnorm" or config.mlp != "swiglu":
        raise ConfigError("cannot export a RoPE model without rmsnorm + swiglu to a Hugging Face family")
    if config.sliding_window:
        if config.qkv_bias or config.o_bias or config.mlp_bias:
            raise ConfigError("cannot export a sliding-window model with biases (Mistral has none)")
        return "mistral"
    if config.qkv_bias and not config.o_bias and not config.mlp_bias:
        return "qwen2"
    if config.qkv_bias != config.o_bias:
        raise ConfigError("cannot export: Llama's attention_bias sets q/k/v and o biases together "
                          f"(qkv_bias={config.qkv_bias}, o_bias={config.o_bias})")
    if orig in ("mistral", "qwen2") and not (config.qkv_bias or config.o_bias or config.mlp_bias):
        return orig
    return "llama"


def _moe_family_for(config: ModelConfig) -> str:
    """'mixtral' (no shared expert) or 'qwen2_moe' (a shared expert), or a one-line error saying why neither fits."""
    c, problems = config, []
    if c.pos_embedding != "rope" or c.norm != "rmsnorm":
        problems.append("both use RoPE and RMSNorm")
    if c.o_bias or c.mlp_bias:
        problems.append("neither has output-projection or MLP biases")
    if c.shared_expert_intermediate_size:
        family = "qwen2_moe"
        if not c.qkv_bias:
            problems.append("Qwen2-MoE has q/k/v biases (qkv_bias=True)")
        if c.sliding_window:
            problems.append("Qwen2-MoE's sliding window is not supported")
    else:
        family = "mixtral"
        if c.qkv_bias:
            problems.append("Mixtral has no q/k/v biases (a model with them needs a shared expert: Qwen2-MoE)")
        if not c.norm_topk_prob:
            problems.append("Mixtral renormalizes the top-k weights (norm_topk_prob=True)")
    if problems:
        raise ConfigError(f"cannot export this mixture-of-experts model as Hugging Face {family}: "
                          f"{'; '.join(problems)}")
    return family


def config_to_hf(config: ModelConfig, dtype: torch.dtype | str = "float32") -> dict[str, Any]:
    """A Hugging Face config.json dict for `config`, with transformers-4 and -5 keys both written.

    Values kept from an imported checkpoint (`extra["hf_config"]`) are written back unless lmforge owns them.
    """
    mt = family_for(config)
    dtype_s = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    hf = dict((config.extra or {}).get("hf_config", {}))
    if hf.get("model_type") != mt:
        hf = {}
    hf.update(model_type=mt, architectures=[ARCHITECTURES[mt]], vocab_size=config.vocab_size,
              tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.init_std,
              dtype=dtype_s, torch_dtype=dtype_s)
    if mt == "gpt2":
        hf.update(n_positions=config.block_size, n_ctx=config.block_size, n_layer=config.n_layer,
                  n_head=config.n_head, n_embd=config.n_embd, n_inner=config.intermediate_size,
                  layer_norm_epsilon=config.norm_eps, activation_function="gelu_new")
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):  # an imported model keeps its training dropout
            if config.dropout or key not in hf:
                hf[key] = config.dropout
        return hf
    scaling = dict(config.rope_scaling) if config.rope_scaling else None
    hf.update(hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
              num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
              num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
              max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, hidden_act="silu",
              rope_theta=config.rope_theta, rope_scaling=scaling,
              rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta})
    if config.dropout or "attention_dropout" not in hf:
        hf["attention_dropout"] = config.dropout
    if mt == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif mt == "mistral":
        hf.update(sliding_window=config.sliding_window)
    elif mt == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    elif mt == "mixtral":  # one width for every expert: intermediate_size
        hf.update(intermediate_size=config.moe_intermediate_size, num_local_experts=config.num_experts,
                  num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.router_aux_loss_coef,
                  sliding_window=config.sliding_window, output_router_logits=False)
        hf.setdefault("router_jitter_noise", 0.0)
    elif mt == "qwen2_moe":
        hf.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                  moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                  shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                  router_aux_loss_coef=config.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[],
                  qkv_bias=True, use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer,
                  output_router_logits=False)
    return hf


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")


def _strip_prefix(names, want_prefix: str) -> dict[str, str]:
    """Some checkpoints (the original `gpt2` upload) omit the `transformer.` / `model.` prefix: name -> full name."""
    out = {}
    for n in names:
        if not n.startswith(want_prefix) and not n.startswith("lm_head."):
            out[want_prefix + n] = n
        else:
            out[n] = n
    return out


def _gpt2_unfuse(sd: Mapping[str, torch.Tensor], n_embd: int) -> dict[str, torch.Tensor]:
    """Conv1D (in, out) -> Linear (out, in), and c_attn split into virtual `#q/#k/#v` tensors."""
    out = {}
    for name, t in sd.items():
        if _CONV1D.search(name):
            t = t.t()
        if ".attn.c_attn." in name:
            if t.shape[0] != 3 * n_embd:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(sd[name].shape)}; the config expects "
                                      f"c_attn of width 3*n_embd = {3 * n_embd}")
            for part, chunk in zip("qkv", t.split(n_embd, dim=0)):
                out[f"{name}#{part}"] = chunk
        else:
            out[name] = t
    return out


def _gpt2_fuse(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `_gpt2_unfuse`: fuse `#q/#k/#v` into c_attn and transpose back to Conv1D."""
    out, parts = {}, {}
    for name, t in sd.items():
        if "#" in name:
            base, part = name.split("#")
            parts.setdefault(base, {})[part] = t
        else:
            out[name] = t
    for base, p in parts.items():
        out[base] = torch.cat([p["q"], p["k"], p["v"]], dim=0)
    return {n: (t.t().contiguous() if _CONV1D.search(n) else t) for n, t in out.items()}


_FUSED_EXPERTS = re.compile(r"^(.*layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _split_experts(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory expert layout -> the per-expert tensors of the Hub layout (see point 4 above):
    `...experts.gate_up_proj` (E, 2He, C) -> experts.{j}.gate and up (He, C) each; `down_proj` (E, C, He) -> down.
    Mixtral's router is also called `mlp.gate` there (`block_sparse_moe.gate` on the Hub)."""
    names = {"gate": "w1", "up": "w3", "down": "w2"} if family == "mixtral" else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    sparse = ".block_sparse_moe." if family == "mixtral" else ".mlp."
    out = {}
    for name, t in sd.items():
        m = _FUSED_EXPERTS.match(name)
        if m is None:
            if family == "mixtral" and re.search(r"layers\.\d+\.mlp\.gate\.weight$", name):
                name = name.replace(".mlp.", sparse)
            out[name] = t
            continue
        layer, kind = m.groups()
        for j in range(t.shape[0]):
            prefix = f"{layer}{sparse}experts.{j}."
            if kind == "gate_up_proj":
                gate, up = t[j].chunk(2, dim=0)  # (He, C) each
                out[prefix + names["gate"] + ".weight"], out[prefix + names["up"] + ".weight"] = gate, up
            else:
                out[prefix + names["down"] + ".weight"] = t[j]  # (C, He)
    return out


def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], config: ModelConfig, expected: Mapping[str, tuple],
                       source: str = "checkpoint", family: str | None = None) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2 transpose/split) HF tensors to lmforge names, checking every name and shape.

    expected: lmforge name -> shape, for every tensor the model needs (a tied lm_head is not listed).
    Errors name the exact tensor: a missing one, one the config has no place for, or a shape mismatch.
    """
    mt = family or (config.extra or {}).get("hf_config", {}).get("model_type") or family_for(config)
    table = expand_names(NAME_MAPS[mt], config.n_layer, config.num_experts)
    full = _strip_prefix([n for n in hf_sd if not IGNORED.search(n)], "transformer." if mt == "gpt2" else "model.")
    sd = {full_name: hf_sd[orig] for full_name, orig in full.items()}
    if mt == "gpt2":
        sd = _gpt2_unfuse(sd, config.n_head * config.head_dim)
    if config.num_experts:
        sd = _split_experts(sd, mt)
    out, used = {}, set()
    for ours, shape in expected.items():
        theirs = table.get(ours)
        if theirs is None:
            raise CheckpointError(f"lmforge tensor {ours!r} has no Hugging Face {mt} name")
        if theirs not in sd:
            raise CheckpointError(f"{source}: missing tensor {theirs.split('#')[0]!r} (needed for {ours})")
        t = sd[theirs]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {theirs!r} has shape {tuple(t.shape)} but the config expects "
                                  f"{tuple(shape)}")
        out[ours] = t
        used.add(theirs)
    if config.tie_word_embeddings:
        used.add("lm_head.weight")  # some checkpoints store the tied head anyway
    extra = sorted(n for n in sd if n not in used)
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0].split('#')[0]!r} ({len(extra)} unexpected "
                              f"in all; does config.json match the weights? n_layer={config.n_layer})")
    return out


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge names -> HF names (GPT-2: fused and transposed). A tied lm_head is left out, as HF saves it."""
    mt = family_for(config)
    table = expand_names(NAME_MAPS[mt], config.n_layer, config.num_experts)
    out = {}
    for ours, t in sd.items():
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if ours not in table:
            raise CheckpointError(f"tensor {ours!r} has no Hugging Face {mt} name (quantized or adapted model? "
                                  "merge or dequantize it first)")
        out[table[ours]] = t
    if mt == "gpt2":
        out = _gpt2_fuse(out)
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# In-memory conversion (used by tests and by other stages that start from a `transformers` model)
# ----------------------------------------------------------------------------------------------------------------
def from_hf_model(hf_model) -> "torch.nn.Module":
    """An lmforge `Transformer` with a copy of the weights of a `transformers` causal LM (same dtype, on CPU)."""
    config = config_from_hf(hf_model.config.to_dict())
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}  # no storage shared with hf_model
    dtype = next(iter(sd.values())).dtype
    return build_model(config, lambda expected: state_dict_from_hf(sd, config, expected, "hf model"), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------------------------------------------
def save_hf_tokenizer(tok, directory, chat_template: str | None = None, model_max_length: int | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json that `transformers.AutoTokenizer` loads with no custom code."""
    from pathlib import Path

    if not (hasattr(tok, "to_hf_dict") and hasattr(tok, "tokenizer_config")):
        raise CheckpointError(f"cannot export a {type(tok).__name__} to Hugging Face tokenizer files")
    d = Path(directory)
    cfg = dict(tok.tokenizer_config())
    atomic_write_json(d / "tokenizer.json", tok.to_hf_dict())
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    if chat_template:
        cfg["chat_template"] = chat_template
    atomic_write_json(d / "tokenizer_config.json", cfg)


# ----------------------------------------------------------------------------------------------------------------
# Directories
# ----------------------------------------------------------------------------------------------------------------
def load_hf_dir(d: Path, dtype="auto", device=None) -> Loaded:
    """A Hugging Face model directory: config.json with `model_type`, and safetensors or pytorch_model.bin."""
    hf_config = read_json(d / "config.json")
    try:
        config = config_from_hf(hf_config)
    except (ConfigError, KeyError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{d / 'config.json'}: {msg}") from None
    family = model_type_of(hf_config)
    if not config.name:
        config.name = d.name
    tied = config.tie_word_embeddings  # tensors the model has no place for are not even read (GPT-2's causal masks)
    sd, stored = read_weights(d, skip=lambda n: IGNORED.search(n) or (tied and n == "lm_head.weight"))
    torch_dtype = resolve_dtype(dtype, _hf_dtype(hf_config) or stored)
    model = build_model(config, lambda expected: state_dict_from_hf(sd, config, expected, str(d), family),
                        dtype=torch_dtype, device=resolve_device(device))
    tok = load_dir_tokenizer(d)
    return Loaded(model, tok, config, generation_config(d, hf_config), chat_template(d), path=str(d))



def export_hf(lm, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `lm` as a Hugging Face directory that `AutoModelForCausalLM`/`AutoTokenizer` load with no custom code."""
    if getattr(lm.model, "quantization_config", None):
        raise CheckpointError("cannot export a quantized model to Hugging Face layout; export the original model")
    config: ModelConfig = lm.config
    want = parse_dtype(dtype) if dtype not in (None, "auto") else None
    sd = {k: (v.to(want) if want is not None and v.is_floating_point() else v)
          for k, v in unique_state_dict(lm.model).items()}
    out_dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    hf_config = config_to_hf(config, out_dtype)
    gen = lm.generation_config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(gen, key, None)
        if value is None and lm.tokenizer is not None:
            value = getattr(lm.tokenizer, key, None)
        if value is not None:
            hf_config[key] = value
    hf_sd = state_dict_to_hf(sd, config)
    with atomic_dir(path) as tmp:
        write_safetensors(hf_sd, tmp, max_shard_bytes)
        atomic_write_json(tmp / "config.json", hf_config)
        gen_dict = {k: v for k, v in gen.to_dict().items()
                    if k in ("bos_token_id", "eos_token_id", "pad_token_id", "temperature", "top_k", "top_p",
                             "max_new_tokens", "repetition_penalty")}
        if gen.temperature == 0:
            gen_dict.pop("temperature")
            gen_dict["do_sample"] = False
        elif gen.top_k or gen.top_p or gen.temperature != 1.0:
            gen_dict["do_sample"] = True
        atomic_write_json(tmp / "generation_config.json", gen_dict)
        if lm.tokenizer is not None:
            save_hf_tokenizer(lm.tokenizer, tmp, chat_template=lm.chat_template, model_max_length=config.block_size)
    return Path(path)
