"""ONNX export of a decoder with its KV cache, and a small ONNX Runtime runner that generates with it.

What ONNX is
------------
ONNX (Open Neural Network Exchange) stores a model as a *graph*: typed tensors flowing through standard operators
(MatMul, Softmax, Concat, ...), with the weights inside the file. Any ONNX runtime can execute it, with no Python
and no PyTorch: ONNX Runtime on servers, phones and browsers (onnxruntime-web), TensorRT, OpenVINO, DirectML.
That is why the courses list it beside GGUF among deployment formats: GGUF is llama.cpp's format, ONNX is the
format of everything else.

Generation needs the KV cache *outside* the graph
-------------------------------------------------
An ONNX graph is a pure function: it keeps no state between calls. lmforge's `KVCache` is state (a buffer the
model writes into), so the exported graph takes the cache as inputs and hands the grown cache back as outputs,
the layout Hugging Face Optimum uses for its decoder exports:

    inputs   input_ids                      (B, T)            int64   the new tokens
             attention_mask                 (B, P + T)        int64   1 = real token, 0 = padding; past and new
             position_ids                   (B, T)            int64   each new token's position
             past_key_values.{i}.key/value  (B, nkv, P, hd)   float   layer i's cached keys/values (P may be 0)
    outputs  logits                         (B, T, V)         float
             present.{i}.key/value          (B, nkv, P+T, hd) float   the cache to feed back next call

B (batch), T (new tokens) and P (past length) are dynamic axes: one graph serves the prefill (P = 0, T = prompt)
and every decode step (T = 1, P grows by one each step). The caller owns the loop: feed `present` back as
`past_key_values`, append one to the mask, and step the position. `OnnxDecoder.generate` is that loop.

How the graph is made
---------------------
`torch.onnx.export` (torch >= 2.5 uses the `torch.export` based exporter, which needs the `onnxscript` package)
traces `DecoderWithPast.forward` below. It does not re-implement the model: it runs lmforge's own `Block`s
(attention, MLP and norms, the very modules `Transformer.forward` runs) and passes them a cache made of plain
tensors: each layer's past concatenated with room for the T new slots, which `Attention.forward` fills (its
per-row `write_idx` path, a scatter) as it does for a `KVCache`. Only what `Transformer.forward` does around the
blocks (embeddings, positions, the mask) is written out here, in its simplest form: always an explicit boolean
mask, never the shortcuts that depend on Python-level facts about the cache. So the exported graph computes the same numbers as the PyTorch model; the
tests compare logits (within 1e-4) and greedy ids (equal) with `lm.generate`.

The export directory (`export_onnx`):

    model.onnx           the graph and its weights (weights over 2 GB go to model.onnx.data beside it)
    onnx_config.json     {"format": "lmforge-onnx", "version": 1, input/output names, n_layer, n_kv_head, ...}
    config.json, tokenizer.json, generation_config.json, chat_template.jinja   the lmforge model directory's
                         metadata, so the runner can decode text and knows EOS

Limits: float32 only (what ONNX Runtime's CPU kernels run fastest and what the comparison is made in); plain
`nn.Linear` weights only (a quantized or LoRA-wrapped model is refused: merge or dequantize first).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from lmforge.errors import CheckpointError, ConfigError, GenerationError
from lmforge.models.config import ModelConfig
from lmforge.utils import atomic_dir, atomic_write_json, read_json

FORMAT = "lmforge-onnx"
FORMAT_VERSION = 1
OPSET = 18


def _require(module: str):
    """Import an optional dependency, or a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"ONNX export/run needs the {module!r} package: pip install 'lmforge[onnx]'") from None


def input_names(n_layer: int) -> list[str]:
    """["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value", ...]"""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(n_layer: int) -> list[str]:
    """["logits", "present.0.key", "present.0.value", ...]"""
    return ["logits", *[f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]]


# ----------------------------------------------------------------------------------------------------------------
# The exported function: the model's blocks with the cache as explicit tensors
# ----------------------------------------------------------------------------------------------------------------
class _TensorCache:
    """The two attributes `Attention.forward` reads from a cache: per-layer key and value buffers, indexed by
    layer. Here each is a plain tensor (B, nkv, P + T, hd) holding the past in slots [0, P)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v


class DecoderWithPast(nn.Module):
    """`Transformer` as a pure function of (new ids, mask, positions, past keys/values) -> (logits, present).

    The shapes (notation of `lmforge.models.decoder`, plus P = past length, S = P + T):
        input_ids (B, T), attention_mask (B, S), position_ids (B, T), past k/v n_layer x (B, nkv, P, hd)
        -> logits (B, T, V), present k/v n_layer x (B, nkv, S, hd)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config: ModelConfig = model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, cfg = self.model, self.config
        B, T = input_ids.shape
        P = past[0].shape[2]
        S = P + T
        x = m.wte(input_ids)  # (B, T, C)
        if m.wpe is not None:  # GPT-2: learned absolute positions
            x = x + m.wpe(position_ids)  # (B, T, C)
            cos = sin = None
        else:  # RoPE: each row's own positions
            cos, sin = m._rope(position_ids, x.dtype)  # (B, 1, T, hd)

        # which key slots each new token may see: causal (slot <= its own slot), real (mask), inside the window
        slots = torch.arange(S, device=x.device)  # (S,)
        query_slots = (slots[P:])[:, None]  # (T, 1): the new tokens sit at slots P..S-1
        allowed = slots[None, :] <= query_slots  # (T, S)
        if cfg.sliding_window:
            allowed = allowed & (slots[None, :] > query_slots - cfg.sliding_window)
        keys = attention_mask.bool()[:, None, :]  # (B, 1, S)
        # a padding query sees only itself (a softmax over nothing would be NaN), as Transformer.forward does
        mask = (allowed[None] & (keys | (slots[None, :] == query_slots)[None]))[:, None]  # (B, 1, T, S)

        # the cache: each layer's past, with T empty slots after it that attention writes the new keys into
        zeros = torch.zeros(B, cfg.n_kv_head, T, cfg.head_dim, dtype=x.dtype, device=x.device)  # (B, nkv, T, hd)
        k = [torch.cat([past[2 * i], zeros], dim=2) for i in range(cfg.n_layer)]  # (B, nkv, S, hd) each
        v = [torch.cat([past[2 * i + 1], zeros], dim=2) for i in range(cfg.n_layer)]
        cache = _TensorCache(k, v)
        write_idx = query_slots.T.expand(B, T)  # (B, T): slot of each new token, P..S-1 in every row
        for i, block in enumerate(m.blocks):
            x, _ = block(x, cos=cos, sin=sin, mask=mask, cache=cache, layer=i, write_idx=write_idx, kv_len=S)
        logits = m.lm_head(m.norm_f(x))  # (B, T, V)
        present = [t for i in range(cfg.n_layer) for t in (k[i], v[i])]
        return (logits, *present)


def _check_exportable(model: nn.Module) -> None:
    """A one-line error unless `model` is a decoder `Transformer` made of plain `nn.Linear` layers."""
    from lmforge.models.decoder import Transformer

    if not isinstance(model, Transformer):
        raise ConfigError(f"ONNX export handles decoder models (lmforge Transformer), not {type(model).__name__}")
    if getattr(model.config, "num_experts", 0):
        raise ConfigError("ONNX export does not handle mixture-of-experts models yet (their routing is data-dependent)")
    if getattr(model, "quantization_config", None):
        raise ConfigError("ONNX export needs float weights; this model is quantized: export the original model")
    for name, mod in model.named_modules():
        if name.endswith(("_proj", "lm_head")) and type(mod) is not nn.Linear:
            raise ConfigError(f"ONNX export needs plain nn.Linear layers; {name} is a {type(mod).__name__} "
                              "(merge the adapter, or export the unquantized model)")


def export_onnx(lm, out: str | os.PathLike, *, opset: int = OPSET, verbose: bool = False) -> Path:
    """Write `lm` (an `LM` holding a decoder) as an ONNX directory with KV-cache inputs/outputs (module docstring).

    The graph is traced in float32 on the CPU from a small example (batch 2, past 3, new 2); the dynamic axes make
    it valid for any batch, past and new length up to the context window. Returns the directory.
    """
    _require("onnxscript")
    onnx = _require("onnx")
    from lmforge.formats.native import _unwrap

    model = _unwrap(lm.model)
    _check_exportable(model)
    cfg: ModelConfig = model.config
    out = Path(out)
    # a float32 CPU copy, in eval mode (dropout off): the caller's model is left as it was
    m = copy.deepcopy(model).float().cpu().eval()
    wrapper = DecoderWithPast(m).eval()
    B, P, T = 2, 3, 2  # example sizes; any size > 1 keeps torch.export from specializing an axis to a constant
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, P + T, dtype=torch.long)
    pos = torch.arange(P, P + T)[None].expand(B, T).contiguous()
    past = [torch.zeros(B, cfg.n_kv_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past")
    total = torch.export.Dim.AUTO  # the mask's length: torch.export finds it equals past + sequence
    # forward(input_ids, attention_mask, position_ids, *past): the varargs are one tuple to torch.export
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past_len} for _ in past))
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            wrapper, (ids, mask, pos, *past), dynamo=True, input_names=input_names(cfg.n_layer),
            output_names=output_names(cfg.n_layer), dynamic_shapes=dynamic,
            opset_version=opset, verbose=verbose, optimize=True)
    with atomic_dir(out) as tmp:
        program.save(str(tmp / "model.onnx"), external_data=_needs_external(m))
        onnx.checker.check_model(str(tmp / "model.onnx"))
        atomic_write_json(tmp / "onnx_config.json", {
            "format": FORMAT, "version": FORMAT_VERSION, "opset": opset, "dtype": "float32",
            "n_layer": cfg.n_layer, "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
            "inputs": input_names(cfg.n_layer), "outputs": output_names(cfg.n_layer)})
        _save_metadata(lm, tmp)
    return out


@contextlib.contextmanager
def _quiet():
    """Hide the exporter's warnings about things lmforge does not use (torchvision ops, axis renames)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _needs_external(model: nn.Module) -> bool:
    """A protobuf file holds at most 2 GB: larger weights go to a side file (model.onnx.data)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9


def _save_metadata(lm, d: Path) -> None:
    """config.json, tokenizer, generation_config.json and chat template, as in an lmforge model directory."""
    from lmforge.utils import atomic_write

    atomic_write_json(d / "config.json", {"format": "lmforge", "version": 1, "dtype": "float32",
                                          **lm.config.to_dict()})
    if lm.tokenizer is not None:
        lm.tokenizer.save(d)
    atomic_write_json(d / "generation_config.json", lm.generation_config.to_dict())
    if lm.chat_template:
        with atomic_write(d / "chat_template.jinja") as f:
            f.write(lm.chat_template)


# ----------------------------------------------------------------------------------------------------------------
# Running the export with ONNX Runtime
# ----------------------------------------------------------------------------------------------------------------
class OnnxDecoder:
    """An exported directory run by ONNX Runtime: one forward call, and greedy generation that feeds the cache back.

        dec = OnnxDecoder("runs/demo-onnx", threads=1)
        ids = dec.generate_ids([464, 825], max_new_tokens=20)     # prefill, then one token per step
        print(dec.generate("The def statement", max_new_tokens=20))

    Arrays are numpy: ids and masks int64, keys/values float32. No torch is needed to run an export.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ort = _require("onnxruntime")
        path = Path(path)
        meta_file = path / "onnx_config.json"
        if not meta_file.is_file():
            raise CheckpointError(f"{path}: no onnx_config.json (not an lmforge ONNX export; make one with "
                                  "`lmforge export MODEL --format onnx --out DIR`)")
        meta = read_json(meta_file)
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_file}: expected format {FORMAT!r} version {FORMAT_VERSION}, found "
                                  f"{meta.get('format')!r} version {meta.get('version')!r}")
        self.path, self.meta = path, meta
        self.n_layer, self.n_kv_head, self.head_dim = meta["n_layer"], meta["n_kv_head"], meta["head_dim"]
        self.block_size = meta["block_size"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a missing or corrupt file
            raise CheckpointError(f"{path / 'model.onnx'}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})"
                                  ) from None
        self.tokenizer = self._tokenizer(path)
        self.eos_token_id = self._eos(path)

    @staticmethod
    def _tokenizer(path: Path):
        from lmforge.tokenizers import load_tokenizer

        has_tok = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.bin"))
        return load_tokenizer(path) if has_tok else None

    def _eos(self, path: Path) -> list[int]:
        eos = read_json(path / "generation_config.json").get("eos_token_id") if (
            path / "generation_config.json").exists() else None
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A cache holding nothing: 2 * n_layer arrays (B, nkv, 0, hd)."""
        return [np.zeros((batch, self.n_kv_head, 0, self.head_dim), np.float32) for _ in range(2 * self.n_layer)]

    def forward(self, input_ids: np.ndarray, past: Sequence[np.ndarray] | None = None,
                attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: logits (B, T, V) and the grown cache. Defaults: an empty past, no padding, and
        positions P..P+T-1 (or, with a mask, each row's count of real tokens so far, as lmforge numbers them)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        B, T = input_ids.shape
        past = list(past) if past is not None else self.empty_past(B)
        P = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((B, P + T), np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if attention_mask.shape != (B, P + T):
            raise GenerationError(f"attention_mask shape {attention_mask.shape} must be (batch, past + new) = "
                                  f"{(B, P + T)}")
        if position_ids is None:
            position_ids = np.clip(attention_mask.cumsum(1) - 1, 0, None)[:, P:]  # (B, T)
        if P + T > self.block_size:
            raise GenerationError(f"sequence of {P + T} tokens exceeds the context window of {self.block_size}")
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": np.asarray(position_ids, dtype=np.int64)}
        names = self.meta["inputs"][3:]
        feeds.update(zip(names, past))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 32,
                     stop_token_ids: Sequence[int] | None = None) -> list[int]:
        """Greedy decoding of one prompt: prefill the whole prompt, then feed one token per step with the cache.
        Stops after `max_new_tokens`, at a stop token (default: the model's EOS; not returned) or at the context
        window. Returns the generated ids."""
        if not prompt_ids:
            raise GenerationError("empty prompt: there is no token to condition on")
        stops = set(self.eos_token_id if stop_token_ids is None else stop_token_ids)
        logits, past = self.forward(np.array([list(prompt_ids)], np.int64))  # prefill: (1, T, V)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
            if len(prompt_ids) + len(out) >= self.block_size or len(out) == max_new_tokens:
                break
            logits, past = self.forward(np.array([[token]], np.int64), past)  # (1, 1, V), cache grows by one
        return out

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Text in, greedy continuation out (needs the export's tokenizer)."""
        if self.tokenizer is None:
            raise ConfigError(f"{self.path} holds no tokenizer; pass token ids to generate_ids instead")
        ids = self.tokenizer.encode(prompt, disallowed_special=())
        if getattr(self.tokenizer, "add_bos_token", False) and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return self.tokenizer.decode(self.generate_ids(ids, max_new_tokens))
