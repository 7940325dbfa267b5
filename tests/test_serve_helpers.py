"""Shared pieces of the serving tests (no tests here): a tiny model directory and a server on a free port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token. "
    "Servers batch requests so that one forward pass decodes many sequences at once. "
    "Once upon a time there was a little model that wanted to talk. It learned words, then sentences. "
) * 8


def build_tiny_model(path: Path, seed: int = 0, family: str = "llama") -> Path:
    """A random tiny Transformer + a BPE tokenizer trained here, saved as an lmforge model directory."""
    from lmforge.models.config import ModelConfig
    from lmforge.generation.config import GenerationConfig
    from lmforge.lm import LM
    from lmforge.models.decoder import Transformer
    from lmforge.tokenizers.bpe import Tokenizer

    tok = Tokenizer.train([TEXT], vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          progress=False)
    torch.manual_seed(seed)
    extra = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2) if family == "llama" else {}
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=2, n_head=4, n_embd=64, init_std=0.3,
                      name=f"tiny-{family}", **extra)
    model = Transformer(cfg).eval()
    lm = LM(model, tok, cfg, GenerationConfig(temperature=1.0, max_new_tokens=32))
    lm.save(path)
    return path


class ServerThread:
    """uvicorn in a background thread on 127.0.0.1 and a free port; `stop()` shuts it down."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def start_server(model_dir: Path, **settings) -> tuple[ServerThread, object]:
    import lmforge
    from lmforge.serve.app import ServerSettings, create_app

    lm = lmforge.load(model_dir)
    settings.setdefault("model_name", model_dir.name)
    app = create_app(lm, ServerSettings(**settings))
    return ServerThread(app), lm
