"""Serving an encoder: OpenAI's `/v1/embeddings` for a BERT-style embedder (e.g. all-MiniLM-L6-v2).

`create_app(lm)` hands an `EncoderLM` here. An encoder has no KV cache and no token loop, so there is no engine:
each request is one `lm.embed` call run in a single worker thread (requests queue behind it; the model's own
matmuls use the cores). The guard middleware (API key, body-size limit, metrics) and the OpenAI error shape are
app.py's own.

    POST /v1/embeddings   {"model": ..., "input": "text" | ["text", ...], "encoding_format": "float" | "base64"}
    GET  /v1/models, /health
    POST /v1/completions, /v1/chat/completions   400: an encoder does not generate

Too long an input is refused (400, code `context_length_exceeded`, naming the input and the limit), as OpenAI's
API does, rather than truncated without telling the caller.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.serve.app import APIError, GuardMiddleware, Metrics, ServerSettings


class EncoderEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def create_encoder_app(lm, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = Metrics()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-embed")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            worker.shutdown(wait=True)

    app = FastAPI(title="lmforge (encoder)", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            return APIError(400, "request body is not valid JSON", code="invalid_json").response()
        loc = ".".join(str(x) for x in first.get("loc", []) if x != "body") or "body"
        return APIError(422, f"{loc}: {first.get('msg', 'invalid value')}", param=loc, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    @app.exception_handler(LmforgeError)
    async def _lmforge(request, e: LmforgeError):
        return APIError(400, str(e)).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "kind": "encoder"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "lmforge"}]}

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def no_generation():
        raise APIError(400, f"{settings.model_name} is an encoder: it serves /v1/embeddings and cannot generate text",
                       code="unsupported_model")

    @app.post("/v1/embeddings")
    async def embeddings(body: EncoderEmbeddingRequest):
        check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise APIError(400, "input is empty", param="input")
        if body.dimensions is not None and body.dimensions != lm.dim:
            raise APIError(400, f"dimensions={body.dimensions}: this model's embeddings have {lm.dim}",
                           param="dimensions")
        res = await asyncio.wrap_future(worker.submit(lm.embed_with_info, texts))
        cut = [i for i, n in enumerate(res.num_truncated) if n]
        if cut:
            i = cut[0]
            raise APIError(400, f"input {i} has {res.num_tokens[i] + res.num_truncated[i]} tokens, more than this "
                           f"model's {lm.max_seq_length}; shorten or split it", param="input",
                           code="context_length_exceeded")
        data = []
        for i, v in enumerate(res.embeddings.tolist()):
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() \
                if body.encoding_format == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(res.num_tokens)
        metrics.prompt_tokens += n
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    return app
