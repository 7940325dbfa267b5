"""Hugging Face BERT / RoBERTa / DistilBERT (and MiniLM, a small BERT) checkpoints <-> lmforge's `Encoder`.

A Hugging Face encoder directory is `config.json` (`model_type` "bert", "roberta" or "distilbert"), the weights
(model.safetensors, sharded safetensors, or pytorch_model.bin), the tokenizer files, and for a sentence-transformers
model also `modules.json`, `1_Pooling/config.json` and `sentence_bert_config.json` (how an embedding is made).

Weight names go through one table per family (`NAMES`), lmforge name -> HF name with `{i}` for the layer, used in
both directions: import renames HF -> lmforge, export lmforge -> HF. No tensor needs a transpose (HF's encoders use
`nn.Linear` throughout, unlike GPT-2's Conv1D). Heads have their own table (`HEAD_NAMES`) per family and task, so a
BertForMaskedLM or DistilBertForQuestionAnswering checkpoint loads its head too (`EncoderLM.heads`).

    lm = lmforge.load("all-MiniLM-L6-v2/")                        # -> EncoderLM (lmforge/encoder_lm.py)
    export_encoder_hf(lm, "out/")                                  # loads in transformers and sentence-transformers

What is checked where: tests/test_encoder.py builds random `BertModel`, `RobertaModel` and `DistilBertModel`s in
transformers, loads them here and compares every hidden state to 1e-5, then exports and loads the export back
in transformers with the same outputs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.formats.native import meta_device, write_safetensors
from lmforge.models.encoder import Encoder, EncoderConfig
from lmforge.tokenizers.roberta import is_roberta_tokenizer_dir, RobertaTokenizer
from lmforge.tokenizers.wordpiece import WordPieceTokenizer
from lmforge.utils import atomic_dir, atomic_write_json, dtype_name, parse_dtype, read_json

ENCODER_MODEL_TYPES = ("bert", "roberta", "distilbert")

# ---- weight names: lmforge -> Hugging Face, one table per family ({i} = layer index) ---------------------------
_BERT_LAYER = {
    "blocks.{i}.attn.q_proj": "encoder.layer.{i}.attention.self.query",
    "blocks.{i}.attn.k_proj": "encoder.layer.{i}.attention.self.key",
    "blocks.{i}.attn.v_proj": "encoder.layer.{i}.attention.self.value",
    "blocks.{i}.attn.o_proj": "encoder.layer.{i}.attention.output.dense",
    "blocks.{i}.ln_1": "encoder.layer.{i}.attention.output.LayerNorm",
    "blocks.{i}.mlp.up_proj": "encoder.layer.{i}.intermediate.dense",
    "blocks.{i}.mlp.down_proj": "encoder.layer.{i}.output.dense",
    "blocks.{i}.ln_2": "encoder.layer.{i}.output.LayerNorm",
}
_BERT = {
    "embeddings.wte": "embeddings.word_embeddings",
    "embeddings.wpe": "embeddings.position_embeddings",
    "embeddings.wtt": "embeddings.token_type_embeddings",
    "embeddings.ln": "embeddings.LayerNorm",
    **_BERT_LAYER,
    "pooler.dense": "pooler.dense",
}
NAMES: dict[str, dict[str, str]] = {
    "bert": _BERT,  # also MiniLM (model_type "bert")
    "roberta": _BERT,  # the same module tree as BERT; only positions and token types differ (config)
    "distilbert": {
        "embeddings.wte": "embeddings.word_embeddings",
        "embeddings.wpe": "embeddings.position_embeddings",
        "embeddings.ln": "embeddings.LayerNorm",
        "blocks.{i}.attn.q_proj": "transformer.layer.{i}.attention.q_lin",
        "blocks.{i}.attn.k_proj": "transformer.layer.{i}.attention.k_lin",
        "blocks.{i}.attn.v_proj": "transformer.layer.{i}.attention.v_lin",
        "blocks.{i}.attn.o_proj": "transformer.layer.{i}.attention.out_lin",
        "blocks.{i}.ln_1": "transformer.layer.{i}.sa_layer_norm",
        "blocks.{i}.mlp.up_proj": "transformer.layer.{i}.ffn.lin1",
        "blocks.{i}.mlp.down_proj": "transformer.layer.{i}.ffn.lin2",
        "blocks.{i}.ln_2": "transformer.layer.{i}.output_layer_norm",
    },
}
# the base model's prefix inside a task model (BertForMaskedLM's "bert.embeddings..."); a bare BertModel has none
PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}

# ---- heads: lmforge head module (lmforge/models/heads.py) -> HF names, per family --------------------------------
HEAD_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "bert": {
        "mlm": {"dense": "cls.predictions.transform.dense", "ln": "cls.predictions.transform.LayerNorm",
                "bias": "cls.predictions.bias", "decoder": "cls.predictions.decoder"},
        "sequence_classification": {"classifier": "classifier"},
        "token_classification": {"classifier": "classifier"},
        "question_answering": {"qa_outputs": "qa_outputs"},
    },
    "roberta": {
        "mlm": {"dense": "lm_head.dense", "ln": "lm_head.layer_norm", "bias": "lm_head.bias",
                "decoder": "lm_head.decoder"},
        "sequence_classification": {"dense": "classifier.dense", "out_proj": "classifier.out_proj"},
        "token_classification": {"classifier": "classifier"},
        "question_answering": {"qa_outputs": "qa_outputs"},
    },
    "distilbert": {
        "mlm": {"dense": "vocab_transform", "ln": "vocab_layer_norm", "bias": "vocab_projector.bias",
                "decoder": "vocab_projector"},
        "sequence_classification": {"pre_classifier": "pre_classifier", "classifier": "classifier"},
        "token_classification": {"classifier": "classifier"},
        "question_answering": {"qa_outputs": "qa_outputs"},
    },
}
# HF architecture class for each (family, head); None = the bare model
ARCHITECTURES = {
    "bert": {None: "BertModel", "mlm": "BertForMaskedLM", "sequence_classification": "BertForSequenceClassification",
             "token_classification": "BertForTokenClassification", "question_answering": "BertForQuestionAnswering"},
    "roberta": {None: "RobertaModel", "mlm": "RobertaForMaskedLM",
                "sequence_classification": "RobertaForSequenceClassification",
                "token_classification": "RobertaForTokenClassification",
                "question_answering": "RobertaForQuestionAnswering"},
    "distilbert": {None: "DistilBertModel", "mlm": "DistilBertForMaskedLM",
                   "sequence_classification": "DistilBertForSequenceClassification",
                   "token_classification": "DistilBertForTokenClassification",
                   "question_answering": "DistilBertForQuestionAnswering"},
}
_IGNORED = ("embeddings.position_ids", "cls.seq_relationship.", "cls.predictions.decoder.bias")  # buffers, NSP head


def to_hf_name(name: str, table: Mapping[str, str]) -> str | None:
    """lmforge tensor name -> HF name through a module table ({i} = layer), or None when the table lacks it.

    to_hf_name("blocks.3.attn.q_proj.weight", NAMES["bert"]) -> "encoder.layer.3.attention.self.query.weight"
    """
    if name in table:  # a bare parameter (the MLM head's output bias)
        return table[name]
    module, _, param = name.rpartition(".")
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    key = f"blocks.{{i}}.{m.group(2)}" if m else module
    if key not in table:
        return None
    return table[key].format(i=m.group(1) if m else "") + "." + param


def from_hf_name(hf_name: str, table: Mapping[str, str]) -> str | None:
    """The inverse of `to_hf_name`: "encoder.layer.3.attention.self.query.weight" -> "blocks.3.attn.q_proj.weight"."""
    for ours, theirs in table.items():
        if hf_name == theirs:
            return ours
        pattern = re.escape(theirs).replace(r"\{i\}", r"(\d+)") + r"\.(\w+)"
        m = re.fullmatch(pattern, hf_name)
        if m:
            return (ours.format(i=m.group(1)) if "{i}" in ours else ours) + "." + m.groups()[-1]
    return None


# ---- config ------------------------------------------------------------------------------------------------------
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_MAPPED = {
    "bert": {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
             "layer_norm_eps", "pad_token_id", "initializer_range", "model_type", "position_embedding_type",
             "torch_dtype", "dtype", "transformers_version", "_name_or_path", "architectures"},
    "distilbert": {"vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "activation", "dropout",
                   "attention_dropout", "max_position_embeddings", "pad_token_id", "initializer_range", "model_type",
                   "torch_dtype", "dtype", "transformers_version", "_name_or_path", "architectures"},
}
_MAPPED["roberta"] = _MAPPED["bert"]


def config_from_hf(hf: Mapping[str, Any]) -> EncoderConfig:
    """An HF config.json dict -> EncoderConfig; unknown model types and unsupported options are one-line errors."""
    family = hf.get("model_type")
    if family not in ENCODER_MODEL_TYPES:
        raise ConfigError(f"model_type {family!r} is not an encoder lmforge supports ({', '.join(ENCODER_MODEL_TYPES)})")
    extra = {k: v for k, v in hf.items() if k not in _MAPPED[family]}
    if family == "distilbert":
        if hf.get("sinusoidal_pos_embds"):  # the sinusoids are stored as weights too; they load like learned ones
            extra["sinusoidal_pos_embds"] = True
        act = hf.get("activation", "gelu")
        if act not in _ACT_FROM_HF:
            raise ConfigError(f"activation {act!r} is not supported (use gelu, gelu_new or relu)")
        return EncoderConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["n_layers"], n_head=hf["n_heads"], n_embd=hf["dim"],
            intermediate_size=hf["hidden_dim"], max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=0, family="distilbert", activation=_ACT_FROM_HF[act], layer_norm_eps=1e-12,
            pad_token_id=hf.get("pad_token_id", 0), pooler=False, dropout=hf.get("dropout", 0.1),
            attn_dropout=hf.get("attention_dropout", 0.1), init_std=hf.get("initializer_range", 0.02), extra=extra)
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ConfigError(f"position_embedding_type {pos!r} is not supported (absolute only)")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        raise ConfigError(f"hidden_act {act!r} is not supported (use gelu, gelu_new or relu)")
    pad = hf.get("pad_token_id", 1 if family == "roberta" else 0)
    return EncoderConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"], intermediate_size=hf.get("intermediate_size"),
        max_position_embeddings=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        family=family, activation=_ACT_FROM_HF[act], layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        pad_token_id=pad if pad is not None else 0, position_offset=(pad + 1) if family == "roberta" else 0,
        pooler=True, dropout=hf.get("hidden_dropout_prob", 0.1), attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02), extra=extra)


def config_to_hf(config: EncoderConfig, head: str | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """EncoderConfig -> HF config.json dict (the fields transformers reads, plus the extras kept at import)."""
    c = config
    if c.family == "distilbert":
        hf: dict[str, Any] = {
            "model_type": "distilbert", "vocab_size": c.vocab_size, "dim": c.n_embd, "n_layers": c.n_layer,
            "n_heads": c.n_head, "hidden_dim": c.intermediate_size, "activation": _ACT_TO_HF[c.activation],
            "dropout": c.dropout, "attention_dropout": c.attn_dropout, "max_position_embeddings":
            c.max_position_embeddings, "pad_token_id": c.pad_token_id, "initializer_range": c.init_std,
            "sinusoidal_pos_embds": False}
    else:
        hf = {
            "model_type": c.family, "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "intermediate_size": c.intermediate_size,
            "hidden_act": _ACT_TO_HF[c.activation], "hidden_dropout_prob": c.dropout,
            "attention_probs_dropout_prob": c.attn_dropout, "max_position_embeddings": c.max_position_embeddings,
            "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.layer_norm_eps, "pad_token_id": c.pad_token_id,
            "initializer_range": c.init_std, "position_embedding_type": "absolute"}
    for k, v in c.extra.items():
        hf.setdefault(k, v)
    if c.family == "distilbert" and c.extra.get("sinusoidal_pos_embds"):
        hf["sinusoidal_pos_embds"] = True
    hf["architectures"] = [ARCHITECTURES[c.family][head]]
    if dtype is not None:
        hf["torch_dtype"] = dtype_name(dtype)
    return hf


# ---- tensors -----------------------------------------------------------------------------------------------------
def _strip_prefix(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Drop the "bert." prefix of task checkpoints; rename old TF-era LayerNorm gamma/beta to weight/bias."""
    prefix = PREFIX[family]
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
        if k.endswith(".gamma") or k.endswith(".beta"):
            k = k.rsplit(".", 1)[0] + (".weight" if k.endswith(".gamma") else ".bias")
        out[k] = v
    return out


def head_kind_of(sd: Mapping[str, torch.Tensor], family: str, architectures: list | None = None) -> str | None:
    """Which task head a checkpoint carries: "mlm", "question_answering", ..., or None for a bare encoder.

    config.json's `architectures` names it ("BertForTokenClassification"); without it the tensor names decide
    (a lone `classifier` is taken as sequence classification, the more common head).
    """
    for arch in architectures or []:
        for kind, name in ARCHITECTURES[family].items():
            if kind and name == arch:
                return kind
    names = set(sd)
    for kind in ("mlm", "question_answering", "sequence_classification", "token_classification"):
        wanted = [t for o, t in HEAD_NAMES[family][kind].items() if o != "decoder"]  # tied decoders may be absent
        if all(any(n.startswith(t + ".") or n == t for n in names) for t in wanted):
            return kind
    return None


def state_dict_from_hf(sd: Mapping[str, torch.Tensor], config: EncoderConfig, source: str = "weights",
                       architectures: list | None = None) -> tuple[dict[str, torch.Tensor], str | None, dict[str, torch.Tensor]]:
    """HF tensors -> (encoder state dict, head kind or None, head state dict in lmforge head names).

    Every tensor the Encoder needs must be present with its shape; a tensor neither the encoder nor a known head
    uses is an error naming it (a wrong config or a family lmforge does not cover).
    """
    sd = _strip_prefix(sd, config.family)
    table = NAMES[config.family]
    with meta_device():
        names = list(Encoder(config).state_dict())
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    no_pooler = config.pooler and not any(k.startswith("pooler.") for k in sd)  # task checkpoints drop the pooler
    for name in names:
        hf_name = to_hf_name(name, table)
        if hf_name not in sd:
            if no_pooler and name.startswith("pooler."):
                continue
            raise CheckpointError(f"{source}: missing tensor {hf_name!r}")
        ours[name] = sd[hf_name]
        used.add(hf_name)
    kind = head_kind_of(sd, config.family, architectures)
    head: dict[str, torch.Tensor] = {}
    if kind:
        for hf_name, t in sd.items():
            if hf_name in used:
                continue
            name = from_hf_name(hf_name, HEAD_NAMES[config.family][kind])
            if name is not None:
                head[name] = t
                used.add(hf_name)
    extra = [k for k in sd if k not in used and not any(k.startswith(p) for p in _IGNORED)]
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} (does config.json match the weights? "
                              f"n_layer={config.n_layer})")
    if kind == "mlm":
        head.pop("decoder.weight", None)  # tied to the word embeddings
        head.pop("decoder.bias", None)  # transformers' alias of the head's bias
    return ours, kind, head


def state_dict_to_hf(encoder: Encoder, head_kind: str | None = None, head: torch.nn.Module | None = None
                     ) -> dict[str, torch.Tensor]:
    """lmforge Encoder (+ optional head) -> HF tensor names (with the "bert." prefix when a head is included)."""
    config = encoder.config
    prefix = PREFIX[config.family] if head_kind else ""
    out = {}
    for name, t in encoder.state_dict().items():
        hf_name = to_hf_name(name, NAMES[config.family])
        if hf_name is None:
            raise CheckpointError(f"no Hugging Face name for encoder tensor {name!r}")
        out[prefix + hf_name] = t.detach().contiguous()
    if head_kind:
        if head is None:
            raise ConfigError(f"head_kind={head_kind!r} needs the head module")
        for name, t in head.state_dict().items():
            if head_kind == "mlm" and name == "decoder.weight":
                continue  # tied: transformers re-ties it to the word embeddings
            hf_name = to_hf_name(name, HEAD_NAMES[config.family][head_kind])
            if hf_name is None:
                raise CheckpointError(f"no Hugging Face name for {head_kind} head tensor {name!r}")
            out[hf_name] = t.detach().contiguous()
    return out


# ---- directories -------------------------------------------------------------------------------------------------
def build_encoder(config: EncoderConfig, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, source: str = "weights") -> Encoder:
    """An `Encoder` holding `sd`: built on the meta device (no random init), shapes checked, tensors assigned."""
    with meta_device():
        model = Encoder(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    sd = dict(sd)
    if config.pooler and not any(k.startswith("pooler.") for k in sd):  # a task checkpoint without pooler weights
        model.pooler = None
        expected = {n: s for n, s in expected.items() if not n.startswith("pooler.")}
    device = torch.device(device or "cpu")
    for name, shape in expected.items():
        if name not in sd:
            raise CheckpointError(f"{source}: missing tensor for {name!r}")
        if tuple(sd[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(sd[name].shape)} but the config "
                                  f"expects {shape}")
        t = sd[name]
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        sd[name] = t.to(device)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def is_encoder_dir(d: str | os.PathLike) -> bool:
    """True when a directory holds an encoder checkpoint this module reads (config.json model_type)."""
    p = Path(d) / "config.json"
    if not p.exists():
        return False
    raw = read_json(p)
    return isinstance(raw, dict) and raw.get("model_type") in ENCODER_MODEL_TYPES


def load_encoder_tokenizer(d: Path, config: EncoderConfig):
    """WordPiece for BERT/DistilBERT/MiniLM directories, byte-level BPE for RoBERTa's (tokenizer.json with a
    ByteLevel pre-tokenizer, or vocab.json + merges.txt); None when the directory has no tokenizer files."""
    if is_roberta_tokenizer_dir(d):
        return RobertaTokenizer.load(d)
    if not ((d / "tokenizer.json").exists() or (d / "vocab.txt").exists()):
        return None
    return WordPieceTokenizer.load(d)


def export_encoder_hf(lm, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                      head_kind: str | None = None, head: torch.nn.Module | None = None) -> Path:
    """Write an HF (and sentence-transformers) directory: config.json, model.safetensors, tokenizer files,
    modules.json + 1_Pooling/config.json + sentence_bert_config.json. Built beside `path`, then swapped in."""
    model = lm.model
    config: EncoderConfig = model.config
    want = parse_dtype(dtype)
    sd = state_dict_to_hf(model, head_kind, head)
    if want is not None:
        sd = {k: v.to(want) if v.is_floating_point() else v for k, v in sd.items()}
    stored = next(iter(sd.values())).dtype
    with atomic_dir(path) as d:
        write_safetensors(sd, d)
        atomic_write_json(d / "config.json", config_to_hf(config, head_kind, stored))
        if lm.tokenizer is not None:
            lm.tokenizer.save(d)
        lm.write_pooling(d)
    return Path(path)
