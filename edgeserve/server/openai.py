"""OpenAI-compatible routes: GET /v1/models, GET /v1/models/{model}, POST /v1/chat/completions
(POST /v1/completions lives in completions.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from edgeserve.api import EdgeServer
from edgeserve.constrain import Grammar
from edgeserve.results import Delta, ToolCall
from edgeserve.results import Usage as ResultUsage
from edgeserve.sampling import SamplingError, SamplingParams
from edgeserve.server import sse
from edgeserve.server.app import SERVER, invalid
from edgeserve.server.choices import Choices
from edgeserve.server.formats import response_grammar
from edgeserve.server.logprobs import TokenText, chat_logprobs
from edgeserve.server.wire import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Choice,
    ChunkChoice,
    DeltaMessage,
    FunctionCall,
    GenerationRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ToolCallDelta,
    ToolCallWire,
    Usage,
    encode,
)
from edgeserve.store import StoredModel, UnknownModel

C = TypeVar("C", bound=sse.Chunks)


def add_routes(app: web.Application) -> None:
    from edgeserve.server import completions  # it imports the helpers below
    from edgeserve.server.embeddings import openai_embeddings

    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions.completions)
    app.router.add_post("/v1/embeddings", openai_embeddings)


def json_response(obj: Any) -> web.Response:
    return web.Response(body=encode(obj), content_type="application/json")


async def respond(request: web.Request, choices: Choices, chunks: C,
                  collect: Callable[[Choices, C], Awaitable[Any]], *, stream: bool,
                  loading: bool, include_usage: bool) -> web.StreamResponse:
    """The answer to a generation request: its SSE stream, or the collected body."""
    if stream:
        return await sse.stream(request, choices, chunks, loading=loading,
                                include_usage=include_usage)
    try:
        return json_response(await collect(choices, chunks))
    finally:
        await choices.aclose()


def usage(u: ResultUsage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens,
                 PromptTokensDetails(u.cached_tokens))


def tool_calls_wire(calls: list[ToolCall] | None) -> list[ToolCallWire] | None:
    if not calls:
        return None
    return [ToolCallWire(c.id, FunctionCall(c.name, c.arguments_json)) for c in calls]


# ---- models ----------------------------------------------------------------------------
def _card(model: StoredModel) -> ModelCard:
    return ModelCard(model.id, "model", model.created, "edgeserve", model.parent)


async def list_models(request: web.Request) -> web.Response:
    store = request.app[SERVER].store
    models = await asyncio.to_thread(store.list)      # walks the disk
    return json_response(ModelList([_card(m) for m in models]))


async def get_model(request: web.Request) -> web.Response:
    store = request.app[SERVER].store
    model_id = request.match_info["model"]
    for model in await asyncio.to_thread(store.list):
        if model.id == model_id:
            return json_response(_card(model))
    raise UnknownModel(model_id, store.root)


# ---- shared by chat and completions --------------------------------------------------------
def checked_sampling(req: GenerationRequest, max_tokens: int | None, logprobs: int | None,
                     renamed: dict[str, str], grammar: Grammar | None = None,
                     explicit: bool = False) -> dict[str, Any]:
    """The request's sampling options, validated; errors name the request's fields.
    `explicit`: max_tokens was given, and must fit in the context after the prompt."""
    unsupported = req.unsupported()
    if unsupported:
        raise invalid(f"{', '.join(unsupported)}: not supported by this server (it would "
                      "change the output)", unsupported[0])
    sampling = req.sampling(max_tokens, logprobs) | {"grammar": grammar,
                                                      "clamp_max_tokens": not explicit}
    try:
        SamplingParams.from_options(**sampling)
    except SamplingError as e:
        raise invalid(str(e), renamed.get(e.param, e.param)) from e
    return sampling


def seeded(sampling: dict[str, Any], choice: int) -> dict[str, Any]:
    """Choice i of a seeded request draws with seed + i: n different answers, reproducible."""
    seed = sampling["seed"]
    return sampling if seed is None or choice == 0 else {**sampling, "seed": seed + choice}


def check_model(server: EdgeServer, model: str) -> bool:
    """404 before any work for a model not in the store; True when it must load first."""
    server.store.path(model)
    return model not in server.models


# ---- chat ------------------------------------------------------------------------------
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = msgspec.json.decode(await request.read(), type=ChatRequest)
    server = request.app[SERVER]
    sampling, renamed = _chat_sampling(req)
    loading = check_model(server, req.model)
    messages = [m.to_dict() for m in req.messages]
    streams: list[AsyncIterator[Delta]] = [
        server.stream_chat(req.model, messages, tools=req.tools, tool_choice=req.tool_choice,
                           **seeded(sampling, i))
        for i in range(req.choices)]
    choices = Choices(streams, [0] * req.choices, renamed=renamed)
    chunks = _ChatChunks(req.model, TokenText(server, req.model))
    return await respond(request, choices, chunks, _collect, stream=bool(req.stream),
                         loading=loading, include_usage=req.include_usage)


def _chat_sampling(req: ChatRequest) -> tuple[dict[str, Any], dict[str, str]]:
    """The sampling options, and the request's names of the engine's parameters."""
    if not req.messages:
        raise invalid("messages must hold at least one message", "messages")
    if req.top_logprobs and not req.logprobs:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                  else req.max_tokens)
    renamed = {"logprobs": "top_logprobs"}
    if req.max_completion_tokens is not None:
        renamed["max_tokens"] = "max_completion_tokens"
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    grammar = response_grammar(req.response_format)
    sampling = checked_sampling(req, max_tokens, logprobs, renamed, grammar,
                                explicit=max_tokens is not None)
    forced = req.tool_choice not in (None, "none", "auto")
    return sampling, {"prompt": "messages", "max_tokens": renamed.get("max_tokens", "max_tokens"),
                      "grammar": "tool_choice" if forced else "response_format"}


async def _collect(choices: Choices, chunks: _ChatChunks) -> ChatCompletion:
    out = [Choice(i, AssistantMessage("assistant", c.text if c.text or not c.tool_calls
                                      else None, tool_calls_wire(c.tool_calls)),
                  c.finish_reason,
                  None if c.logprobs is None else chat_logprobs(c.logprobs, chunks.text))
           for i, c in enumerate(await choices.gather())]
    return ChatCompletion(chunks.id, "chat.completion", chunks.created, chunks.model, out,
                          usage(choices.usage()))


class _ChatChunks:
    """The `chat.completion.chunk` events of one stream: one id and one `created` for all."""

    def __init__(self, model: str, text: TokenText) -> None:
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model, self.text = model, text
        self.calls: dict[int, int] = {}     # choice -> index of its last tool call

    def _event(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(self.id, "chat.completion.chunk", self.created, self.model,
                                    choices, usage)
        return sse.event(encode(chunk))

    def start(self, n: int) -> bytes:
        return b"".join(self._event([ChunkChoice(i, DeltaMessage(role="assistant", content=""))])
                        for i in range(n))

    def delta(self, index: int, delta: Delta) -> bytes:
        out = b""
        # Tokens whose text is held back (a partial character, a possible stop string)
        # still bring their log-probabilities.
        if delta.text or delta.logprobs:
            logprobs = chat_logprobs(delta.logprobs, self.text) if delta.logprobs else None
            out = self._event([ChunkChoice(index, DeltaMessage(content=delta.text), None,
                                           logprobs)])
        for call in delta.tool_calls or []:     # each call whole, in one delta
            k = self.calls[index] = self.calls.get(index, -1) + 1
            wire = ToolCallDelta(k, call.id, FunctionCall(call.name, call.arguments_json))
            out += self._event([ChunkChoice(index, DeltaMessage(tool_calls=[wire]))])
        if delta.finish_reason:
            out += self._event([ChunkChoice(index, DeltaMessage(), delta.finish_reason)])
        return out

    def usage(self, u: ResultUsage) -> bytes:
        return self._event([], usage(u))
