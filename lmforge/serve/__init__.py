"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine, plus a browser chat page.

    engine.py     the scheduler loop: requests join and leave one shared KV cache between decode steps
    constrain.py  JSON / JSON-schema / tool-call constrained decoding (byte automata checked per token)
    app.py        FastAPI endpoints for decoders (/v1/completions, /v1/chat/completions, /metrics, ...)
    encoder.py    /v1/embeddings for encoders (BERT, MiniLM)
    server.py     picks the app for a model and runs it (uvicorn)
    static/       the chat page (one HTML file, no build step)

Start it with `lmforge serve MODEL` (lmforge/cli/serve.py) or `lmforge.serve.server.serve(lm, settings)`;
docs/serving.md explains the concepts. Importing this package loads nothing heavy.
"""
