"""POST /v1/embeddings (OpenAI) and POST /api/embed, /api/embeddings (Ollama)."""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import msgspec
import numpy as np
from aiohttp import web

from edgeserve.server.app import SERVER, invalid


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None         # accepted, no effect


class OllamaEmbedRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str] = ""
    prompt: str = ""                # /api/embeddings (the older route) sends prompt
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


def _inputs(value: str | list[Any]) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise invalid("input must not be empty", "input")
    if all(isinstance(v, int) for v in value):
        return [value]
    if all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value):
        return list(value)
    raise invalid("input must be a text, a list of texts, token ids or a list of token-id "
                  "lists (not a mixture)", "input")


async def openai_embeddings(request: web.Request) -> web.Response:
    req = msgspec.json.decode(await request.read(), type=EmbeddingRequest)
    server = request.app[SERVER]
    server.store.path(req.model)                # 404 before any work
    inputs = _inputs(req.input)
    if req.dimensions is not None:
        await server.load(req.model)
        size = server.models[req.model].spec.hidden_size
        if req.dimensions != size:
            raise invalid(f"dimensions {req.dimensions} is not supported: model '{req.model}' "
                          f"embeds in {size} dimensions only", "dimensions")
    out = await server.embed(req.model, inputs)
    vectors = out.vectors.numpy()
    data = [{"object": "embedding", "index": i,
             "embedding": _encoded(v, req.encoding_format)} for i, v in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}}
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


def _encoded(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":         # little-endian float32, as OpenAI sends it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


async def ollama_embed(request: web.Request) -> web.Response:
    """/api/embed: {"embeddings": [[...], ...]}; /api/embeddings: {"embedding": [...]}."""
    from edgeserve.server.ollama_wire import model_id

    req = msgspec.json.decode(await request.read(), type=OllamaEmbedRequest)
    server = request.app[SERVER]
    model = model_id(server.store, req.model)
    start = time.perf_counter_ns()
    legacy = request.path == "/api/embeddings"
    inputs = _inputs(req.prompt if legacy else req.input)
    await server.load(model)
    loaded = time.perf_counter_ns()
    out = await server.embed(model, inputs, truncate=req.truncate)
    vectors = [[float(x) for x in v] for v in out.vectors.numpy()]
    body: dict[str, Any] = {"embedding": vectors[0]} if legacy else {
        "model": req.model, "embeddings": vectors,
        "total_duration": time.perf_counter_ns() - start, "load_duration": loaded - start,
        "prompt_eval_count": out.prompt_tokens}
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")
