"""`lmforge serve MODEL`: an OpenAI-compatible server with continuous batching and a chat page.

    lmforge serve runs/demo                                  # http://127.0.0.1:8000  (chat page at /)
    lmforge serve runs/demo --port 9000 --api-key s3cret --max-batch 16 --model-name demo
    lmforge serve runs/demo --config serve.yaml              # the same fields in YAML
    lmforge serve runs/demo --rag-index idx --rag-k 4        # chat answers grounded in `lmforge rag index` output

Then any OpenAI client works against it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret")
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}])

The server binds 127.0.0.1 (this machine only) unless `--host` says otherwise; use `--api-key` whenever it listens
on a network. The served model id is the model directory's name unless `--model-name` is given.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmforge import argconf
from lmforge.errors import ConfigError


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes the server to the "
                                                              "network (set --api-key then)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on the API"})
    model_name: str | None = field(default=None, metadata={"help": "model id clients send (default: the model "
                                                                   "directory's name)"})
    max_batch: int = field(default=8, metadata={"help": "sequences decoded together (KV-cache rows); 1 disables "
                                                        "batching"})
    max_queue: int = field(default=64, metadata={"help": "requests allowed to wait for a slot; more get 429"})
    max_len: int | None = field(default=None, metadata={"help": "tokens per sequence (prompt + output) in the KV "
                                                                "cache (default: context window, at most 2048)"})
    max_tokens_limit: int = field(default=4096, metadata={"help": "largest max_tokens a request may ask for"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body (bytes); more get 413"})
    cors_origins: list[str] = field(default_factory=list, metadata={"help": "comma-separated origins allowed to "
                                                                            "call the API from a browser (off by "
                                                                            "default)"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    device: str | None = field(default=None, metadata={"help": "cpu (default), auto, cuda, mps"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's)"})
    rag_index: str | None = field(default=None, metadata={"help": "ground chat answers in this index (a directory "
                                                                  "made by `lmforge rag index`, or a postgres:// "
                                                                  "URL): numbered sources, checked citations"})
    rag_k: int = field(default=4, metadata={"help": "sources retrieved per chat request (with --rag-index)"})
    rag_min_score: float | None = field(default=None, metadata={"help": "refuse when the best hit scores below "
                                                                        "this (hybrid retriever's scale)"})
    rag_embedder: str | None = field(default=None, metadata={"help": "embedder for --rag-index (default: the one "
                                                                       "the index records; another is an error)"})

    def __post_init__(self):
        if not 0 < int(self.port) < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        for name in ("max_batch", "max_queue", "max_tokens_limit", "max_body_bytes", "rag_k"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model directory, Hugging Face directory or Hub id")
    p.add_argument("--config", help="YAML file with any of the fields below")
    argconf.add_arguments(p, ServeConfig)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    import lmforge
    from lmforge.serve.app import ServerSettings
    from lmforge.serve.server import serve

    cfg = argconf.from_cli(ServeConfig, args, args.config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rag = None
    if cfg.rag_index:  # before the model loads: a bad index or embedder is a one-line error at once
        from lmforge.serve.rag import RagChat

        rag = RagChat.open(cfg.rag_index, k=cfg.rag_k, min_score=cfg.rag_min_score, embedder=cfg.rag_embedder,
                           api_key=os.environ.get("OPENAI_API_KEY"))
    lm = lmforge.load(args.model, dtype=cfg.dtype, device=cfg.device)
    if rag is not None and getattr(lm, "is_encoder", False):
        raise ConfigError(f"--rag-index needs a decoder to answer with; {args.model} is an encoder")
    name = cfg.model_name or Path(str(args.model).rstrip("/")).name
    settings = ServerSettings(model_name=name, api_key=cfg.api_key, max_batch=cfg.max_batch,
                              max_queue=cfg.max_queue, max_len=cfg.max_len, max_body_bytes=cfg.max_body_bytes,
                              max_tokens_limit=cfg.max_tokens_limit, cors_origins=list(cfg.cors_origins), rag=rag)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: listening on {cfg.host} without --api-key: anyone who can reach it can use the model")
    print(f"serving {name!r} ({lm}) on http://{cfg.host}:{cfg.port}  (chat page: /, API: /v1)"
          + (f", answers grounded in {cfg.rag_index}" if rag is not None else ""))
    serve(lm, settings, host=cfg.host, port=cfg.port)
    return 0
