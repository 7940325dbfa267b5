"""Which app serves a model, and running it: decoders get the engine and the chat endpoints (lmforge.serve.app),
encoders get /v1/embeddings (lmforge.serve.encoder). The one module that knows both kinds."""

from __future__ import annotations

import signal
import threading

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
    """Run the server until Ctrl-C (uvicorn, one process: the engine batches requests inside it).

    A decoder's engine loop runs on this (the main) thread and uvicorn on a second one: the main thread loaded
    the model and owns PyTorch's CPU thread pool, and model work on another thread would run each decode step
    through a second pool that sleeps between operations (2 ms of a 7 ms step here; see `Engine.run`). The event
    loop only moves bytes and text. Ctrl-C and SIGTERM ask uvicorn to exit as it would on the main thread; its
    shutdown stops the engine (the app's lifespan), which ends `engine.run` here."""
    import uvicorn  # the server's own dependency, imported only when a server runs

    app = build_app(lm, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    state = getattr(app.state, "lmforge", None)
    if state is None:  # an encoder: no engine loop, uvicorn keeps the main thread
        server.run()
        return
    engine = state.engine
    engine.start(thread=False)  # running: the app's lifespan starts no thread of its own

    def http() -> None:
        try:
            server.run()
        finally:  # however uvicorn ends (shutdown, or a port it could not bind), the engine loop ends too
            engine.shutdown()

    def stop(signum, frame) -> None:  # what uvicorn's own handler does on the main thread
        server.force_exit = server.should_exit and signum == signal.SIGINT  # a second Ctrl-C: don't wait
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    web = threading.Thread(target=http, name="lmforge-http", daemon=True)
    web.start()
    try:
        # until the engine shuts down: with the server (then uvicorn is ending), or after an internal error (then
        # the server stays up and answers 503, as it did with the engine on its own thread, until it is stopped)
        engine.run()
    except BaseException:
        server.should_exit = True
        raise
    finally:
        web.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:  # uvicorn never served (e.g. the port was taken; it logged why)
        raise SystemExit(1)
