"""OpenAI-compatible routes: GET /v1/models, GET /v1/models/{model}, POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, cast

import msgspec
from aiohttp import web

from edgeserve.api import EdgeServer
from edgeserve.results import Delta, InvalidRequest
from edgeserve.results import Usage as ResultUsage
from edgeserve.sampling import SamplingError, SamplingParams
from edgeserve.server.app import SERVER, api_error, invalid
from edgeserve.server.wire import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    encode,
)
from edgeserve.store import StoredModel, UnknownModel

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}     # tells proxies not to buffer the stream


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(obj), status=status, content_type="application/json")


# ---- models ----------------------------------------------------------------------------
def _card(model: StoredModel) -> ModelCard:
    return ModelCard(model.id, "model", model.created, "edgeserve", model.parent)


async def list_models(request: web.Request) -> web.Response:
    store = request.app[SERVER].store
    models = await asyncio.to_thread(store.list)      # walks the disk
    return _json(ModelList([_card(m) for m in models]))


async def get_model(request: web.Request) -> web.Response:
    store = request.app[SERVER].store
    model_id = request.match_info["model"]
    for model in await asyncio.to_thread(store.list):
        if model.id == model_id:
            return _json(_card(model))
    raise UnknownModel(model_id, store.root)


# ---- chat ------------------------------------------------------------------------------
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = msgspec.json.decode(await request.read(), type=ChatRequest)
    server = request.app[SERVER]
    sampling = _checked_sampling(req)
    server.store.path(req.model)    # 404 before any work for a model not in the store
    messages = [m.to_dict() for m in req.messages]
    try:
        if req.stream:
            return await _stream_chat(request, server, req, messages, sampling)
        out = await server.chat(req.model, messages, **sampling)
    except InvalidRequest as e:
        if e.param == "prompt":     # the prompt of a chat is its messages
            raise invalid(str(e), "messages") from e
        raise
    choice = Choice(0, AssistantMessage("assistant", out.text), out.finish_reason)
    return _json(ChatCompletion(_completion_id(), "chat.completion", int(time.time()),
                                req.model, [choice], _usage(out.usage)))


def _checked_sampling(req: ChatRequest) -> dict[str, Any]:
    if req.n != 1:
        raise invalid(f"n must be 1 (one choice per request), got {req.n}", "n")
    if req.logprobs:
        raise invalid("logprobs are not supported", "logprobs")
    sampling = req.sampling()
    try:
        SamplingParams.from_options(**sampling)
    except SamplingError as e:
        # Name the field the client sent: max_completion_tokens sets max_tokens.
        param = e.param
        if param == "max_tokens" and req.max_completion_tokens is not None:
            param = "max_completion_tokens"
        raise invalid(str(e), param) from e
    return sampling


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(usage: ResultUsage) -> Usage:
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


class _Chunks:
    """The SSE events of one streamed completion: one id and one `created` for all."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = _completion_id(), int(time.time()), model

    def _event(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(self.id, "chat.completion.chunk", self.created, self.model,
                                    choices, usage)
        return b"data: " + encode(chunk) + b"\n\n"

    def role(self) -> bytes:
        return self._event([ChunkChoice(0, DeltaMessage(role="assistant", content=""))])

    def content(self, text: str) -> bytes:
        return self._event([ChunkChoice(0, DeltaMessage(content=text))])

    def finish(self, reason: str) -> bytes:
        return self._event([ChunkChoice(0, DeltaMessage(), reason)])

    def usage(self, usage: ResultUsage) -> bytes:
        return self._event([], _usage(usage))


async def _stream_chat(request: web.Request, server: EdgeServer, req: ChatRequest,
                       messages: list[dict[str, Any]], sampling: dict[str, Any]
                       ) -> web.StreamResponse:
    deltas = cast(AsyncGenerator[Delta, None],
                  server.stream_chat(req.model, messages, **sampling))
    try:
        # Wait for the first piece before the headers, so that a request the server
        # refuses (bad prompt, no memory, busy) still gets its own HTTP status.
        first = await anext(deltas)
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        try:
            await _relay(resp, _Chunks(req.model), first, deltas, include_usage)
        except ConnectionError:
            pass        # the client left; closing `deltas` below cancels the sequence
        except Exception as e:
            await _send_error(resp, e)
        return resp
    finally:
        await deltas.aclose()


async def _relay(resp: web.StreamResponse, chunks: _Chunks, delta: Delta,
                 rest: AsyncGenerator[Delta, None], include_usage: bool) -> None:
    await resp.write(chunks.role())
    while True:
        if delta.text:
            await resp.write(chunks.content(delta.text))
        if delta.finish_reason:
            await resp.write(chunks.finish(delta.finish_reason))
            if include_usage and delta.usage is not None:
                await resp.write(chunks.usage(delta.usage))
            await resp.write(b"data: [DONE]\n\n")
            return
        delta = await anext(rest)


async def _send_error(resp: web.StreamResponse, e: Exception) -> None:
    """The headers are gone: the error becomes the stream's last event."""
    with contextlib.suppress(ConnectionError):
        await resp.write(b"data: " + api_error(e).body() + b"\n\n")
