"""`lmforge info | import | export | attention-map`: look at a model, convert it, and see what it attends to.

    lmforge info gpt2                                        # a preset: parameters and memory per dtype
    lmforge info runs/demo                                   # a model directory (weights are not loaded)
    lmforge import path/to/hf-model --out runs/imported      # any format `lmforge.load` reads -> lmforge directory
    lmforge export runs/demo --format hf --out runs/demo-hf  # -> transformers.AutoModelForCausalLM loads it
    lmforge export runs/demo --format gguf --out demo.gguf   # -> llama.cpp
    lmforge export runs/demo --format onnx --out runs/demo-onnx   # -> ONNX Runtime (KV cache as inputs/outputs)
    lmforge attention-map runs/demo --prompt "The cat sat on the mat" --layer 0 --head 1 --out attn.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from lmforge.models.config import PRESETS, ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.utils import check_output, human_bytes

# bytes per parameter of each storage type (course tables: fp32 4 B, bf16 2 B, int8 1 B, int4 half a byte)
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def register(subparsers: argparse._SubParsersAction) -> None:
    i = subparsers.add_parser("info", help="parameters and memory per dtype of a preset or a model",
                              description="Parameter count, shapes and memory per dtype of a preset name, an lmforge "
                                          "or Hugging Face directory, a llama2.c .bin or a .gguf.")
    i.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a model path, or a Hub id (config only)")
    i.add_argument("--context", type=int, default=None,
                   help="tokens for the KV-cache estimate (default: the model's context length)")
    i.set_defaults(func=cmd_info)

    im = subparsers.add_parser("import", help="convert any model lmforge reads into an lmforge model directory",
                               description="Read a Hugging Face directory, Hub id, llama2.c .bin or .gguf and write "
                                           "an lmforge model directory.")
    im.add_argument("src", help="what to read (anything `lmforge.load` accepts)")
    im.add_argument("--out", required=True, type=Path, help="the lmforge model directory to write")
    im.add_argument("--dtype", default="auto", help="auto (keep the checkpoint's), float32, bfloat16, float16")
    im.add_argument("--tokenizer", type=Path, default=None, help="llama2.c only: the tokenizer .bin")
    im.add_argument("--overwrite", action="store_true", help="write into --out even if it already holds a model")
    im.set_defaults(func=cmd_import)

    ex = subparsers.add_parser("export", help="write a model as a Hugging Face directory, a GGUF file or ONNX",
                               description="Export a model for other runtimes: --format hf (transformers, vLLM, "
                                           "TGI), --format gguf (llama.cpp) or --format onnx (ONNX Runtime; a "
                                           "directory with model.onnx, float32).")
    ex.add_argument("model", help="the model to export (anything `lmforge.load` accepts)")
    ex.add_argument("--format", required=True, choices=["hf", "gguf", "onnx"], help="hf, gguf or onnx")
    ex.add_argument("--out", required=True, type=Path, help="output directory (hf, onnx) or .gguf file (gguf)")
    ex.add_argument("--dtype", default=None,
                    help="hf: float32, bfloat16, float16 (default: as loaded); gguf: the GGUF tensor type")
    ex.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    ex.set_defaults(func=cmd_export)

    am = subparsers.add_parser("attention-map", help="plot one head's attention weights for a prompt (PNG)",
                               description="Run the prompt through the model and draw the attention weights of one "
                                           "layer and head as a heatmap with the tokens as labels.")
    am.add_argument("model", help="the model (anything `lmforge.load` accepts)")
    am.add_argument("--prompt", required=True, help="the text to look at")
    am.add_argument("--layer", type=int, default=0, help="layer index (0-based; negative counts from the end)")
    am.add_argument("--head", type=int, default=0, help="query head index (0-based)")
    am.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    am.set_defaults(func=cmd_attention_map)


# ----------------------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------------------
def read_config(model: str) -> ModelConfig:
    """The ModelConfig of a preset name or a model path, reading weights only when the format needs it."""
    if model in PRESETS:
        return ModelConfig.from_name(model)
    p = Path(model)
    if p.is_dir() and (p / "config.json").exists():
        from lmforge.formats.hf import config_from_hf
        from lmforge.utils import read_json

        raw = read_json(p / "config.json")
        if raw.get("format") == "lmforge":
            return ModelConfig.from_dict({k: v for k, v in raw.items() if k not in ("format", "version", "dtype")})
        try:
            config = config_from_hf(raw)
            config.name = config.name or p.resolve().name
            return config
        except KeyError as e:
            raise CheckpointError(f"{p / 'config.json'}: missing key {e}") from None
    if p.exists():
        from lmforge.loader import load

        return load(p).config
    from lmforge.loader import HUB_ID, download

    if "/" in model and HUB_ID.match(model):  # a Hub id (owner/name): fetch config.json only, no weights
        config = read_config(str(download(model, config_only=True)))
        config.name = model
        return config
    import difflib

    close = difflib.get_close_matches(model, PRESETS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"presets: {', '.join(PRESETS)}"
    raise ConfigError(f"{model!r} is neither a preset, an existing path nor a Hub id (owner/name); {hint}")


def info_lines(config: ModelConfig, context: int | None = None) -> list[str]:
    """The `lmforge info` report for a config: shapes, parameter counts, weight and KV-cache memory per dtype."""
    n = config.num_params()
    n_body = config.num_params(include_embeddings=False)
    ctx = context or config.block_size
    kv_per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim  # k and v, every layer
    attn = "MHA" if config.n_kv_head == config.n_head else ("MQA" if config.n_kv_head == 1 else "GQA")
    lines = [
        f"model: {config.name or '(unnamed)'}",
        f"  layers {config.n_layer}, n_embd {config.n_embd}, heads {config.n_head} (kv {config.n_kv_head}, {attn}), "
        f"head_dim {config.head_dim}, mlp {config.mlp} {config.intermediate_size}",
        f"  vocab {config.vocab_size}, context {config.block_size}, positions {config.pos_embedding}"
        + (f" (theta {config.rope_theta:g}" + (f", {config.rope_scaling.get('rope_type')} scaling" if
                                                config.rope_scaling else "") + ")"
           if config.pos_embedding == "rope" else "")
        + f", norm {config.norm}, lm_head {'tied' if config.tie_word_embeddings else 'untied'}"
        + (f", sliding window {config.sliding_window}" if config.sliding_window else ""),
        f"parameters: {n:,} ({_short(n)}); without embeddings{' and head' if not config.tie_word_embeddings else ''}"
        f": {n_body:,} ({_short(n_body)})",
        f"{'dtype':<6}{'weights':>12}{'KV cache @' + str(ctx):>22}",
    ]
    if config.num_experts:  # a mixture of experts: each token uses only k experts' weights
        used, shared = config.num_params(active=True), config.shared_expert_intermediate_size
        plus = f", plus a shared one of width {shared}" if shared else ""
        lines.insert(4, f"experts: {config.num_experts} per layer of width {config.moe_intermediate_size}, "
                     f"{config.num_experts_per_tok} per token{plus}; parameters used per token: {used:,} "
                     f"({_short(used)})")
    for name, b in BYTES_PER_PARAM.items():
        kv = human_bytes(kv_per_token * ctx * b) if name in ("fp32", "bf16", "int8") else "-"
        lines.append(f"{name:<6}{human_bytes(n * b):>12}{kv:>22}")
    lines.append("(weights only: int8/int4 scales add ~1-6%; activations and optimizer state are extra — "
                 "AdamW training in fp32 needs about 16 bytes per parameter)")
    return lines


def _short(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cmd_info(args) -> int:
    config = read_config(args.model)
    print("\n".join(info_lines(config, args.context)))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# import / export
# ----------------------------------------------------------------------------------------------------------------
def cmd_import(args) -> int:
    from lmforge.loader import load

    check_output(args.out, overwrite=args.overwrite)
    lm = load(str(args.src), dtype=args.dtype, tokenizer=args.tokenizer)
    lm.save(args.out)
    print(f"wrote {args.out} ({lm!r}, tokenizer: {type(lm.tokenizer).__name__ if lm.tokenizer else 'none'})")
    return 0


def cmd_export(args) -> int:
    from lmforge.formats.hf import export_hf
    from lmforge.loader import load

    if args.format == "onnx" and args.dtype not in (None, "float32", "fp32"):
        raise ConfigError(f"--dtype {args.dtype}: ONNX export writes float32 only")
    check_output(args.out, overwrite=args.overwrite, kind="file" if args.format == "gguf" else "dir")
    lm = load(str(args.model))
    if args.format == "hf":
        export_hf(lm, args.out, dtype=args.dtype)
        print(f"wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    elif args.format == "onnx":
        from lmforge.formats.onnx import export_onnx

        print(f"exporting {lm!r} to ONNX (tracing the graph takes a while)...", flush=True)
        export_onnx(lm, args.out)
        print(f"wrote {args.out}: run it with lmforge.formats.onnx.OnnxDecoder({str(args.out)!r}) or onnxruntime")
    else:
        from lmforge.formats.gguf import export_gguf

        export_gguf(lm, args.out, **({"dtype": args.dtype} if args.dtype else {}))
        print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# attention maps
# ----------------------------------------------------------------------------------------------------------------
def attention_weights(lm, prompt: str, layer: int, head: int) -> tuple[list[str], torch.Tensor]:
    """The tokens of `prompt` (as text pieces) and one head's attention weights over them, (T, T).

    Row t is query position t; it sums to 1 over the key positions 0..t it may see (causal: the upper triangle
    is zero).
    """
    tok = lm.tokenizer
    if tok is None:
        raise CheckpointError("this model has no tokenizer; an attention map needs one to label the tokens")
    ids = tok.encode(prompt, disallowed_special=())
    if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    if not ids:
        raise ConfigError("the prompt is empty")
    cfg = lm.config
    if not -cfg.n_layer <= layer < cfg.n_layer:
        raise ConfigError(f"--layer {layer} is out of range: the model has {cfg.n_layer} layers")
    if not 0 <= head < cfg.n_head:
        raise ConfigError(f"--head {head} is out of range: the model has {cfg.n_head} heads")
    ids = ids[-cfg.block_size:]
    x = torch.tensor([ids], device=lm.device)
    with torch.no_grad():
        out = lm.model(x, output_attentions=True)
    weights = out.attentions[layer][0, head].float().cpu()  # (T, T)
    names = {i: s for s, i in getattr(tok, "special_tokens", {}).items()}
    labels = [names.get(i) or tok.vocab[i].decode("utf-8", errors="replace") for i in ids]
    return labels, weights


def plot_attention(labels: list[str], weights: torch.Tensor, title: str = "") -> bytes:
    """A heatmap PNG (bytes) of attention weights: queries down, keys across, token labels on both axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = len(labels)
    size = min(4 + 0.35 * T, 24)
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=float(weights.max()))
    shown = [repr(s)[1:-1].replace(" ", "\u2423") for s in labels]  # make spaces and newlines visible
    ax.set_xticks(range(T), shown, rotation=90, fontsize=8)
    ax.set_yticks(range(T), shown, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def cmd_attention_map(args) -> int:
    from lmforge.loader import load
    from lmforge.utils import atomic_write_bytes

    lm = load(str(args.model), dtype="float32")
    labels, weights = attention_weights(lm, args.prompt, args.layer, args.head)
    layer = args.layer % lm.config.n_layer
    png = plot_attention(labels, weights, f"{lm.config.name or args.model}: layer {layer}, head {args.head}")
    atomic_write_bytes(args.out, png)
    print(f"wrote {args.out} ({len(labels)} tokens)")
    return 0
