"""Which app serves a model, and running it: decoders get the engine and the chat endpoints (lmforge.serve.app),
encoders get /v1/embeddings (lmforge.serve.encoder). The one module that knows both kinds."""

from __future__ import annotations

from fastapi import FastAPI

from lmforge.serve.app import ServerSettings, create_app
from lmforge.serve.encoder import create_encoder_app


def build_app(lm, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app for `lm`: an encoder's embeddings endpoint, or a decoder's full OpenAI-compatible server."""
    settings = settings or ServerSettings()
    if getattr(lm, "is_encoder", False):
        return create_encoder_app(lm, settings)
    return create_app(lm, settings)


def serve(lm, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until Ctrl-C (uvicorn, one process: the engine batches requests inside it)."""
    import uvicorn  # the server's own dependency, imported only when a server runs

    uvicorn.run(build_app(lm, settings), host=host, port=port, log_level="info")
