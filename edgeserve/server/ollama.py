"""Ollama-compatible routes: /api/chat, /api/generate, /api/tags, /api/ps, /api/show,
/api/version. Errors leave as Ollama's {"error": "message"} with the status the OpenAI
routes would give."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

import edgeserve
from edgeserve.api import EdgeServer
from edgeserve.results import Delta, InvalidRequest
from edgeserve.results import ToolCall as Call
from edgeserve.sampling import SamplingError, SamplingParams
from edgeserve.server.app import SERVER, api_error
from edgeserve.server.embeddings import ollama_embed
from edgeserve.server.formats import format_grammar
from edgeserve.server.ollama_show import describe_tagged
from edgeserve.server.ollama_wire import (
    AssistantMessage,
    CallFunction,
    ChatRequest,
    Description,
    GenerateRequest,
    Response,
    ShowRequest,
    ToolCall,
    digest,
    from_epoch,
    in_seconds,
    keep_alive_seconds,
    model_id,
    timestamp,
)
from edgeserve.store import ModelStore, StoredModel, UnknownModel, split_tag

DEFAULT_NUM_PREDICT = 4096      # num_predict -1: this many tokens, or up to the context
NDJSON = "application/x-ndjson"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Deltas = AsyncGenerator[Delta, None]
T = TypeVar("T")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/chat", _ollama_errors(chat))
    app.router.add_post("/api/generate", _ollama_errors(generate))
    app.router.add_get("/api/tags", _ollama_errors(tags))
    app.router.add_get("/api/ps", _ollama_errors(ps))
    app.router.add_post("/api/show", _ollama_errors(show))
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/embed", _ollama_errors(ollama_embed))
    app.router.add_post("/api/embeddings", _ollama_errors(ollama_embed))


def _ollama_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as e:
            return _error(e)
    return wrapped


def _error(e: Exception) -> web.Response:
    err = api_error(e)      # the status (and Retry-After) of the OpenAI routes
    message = f"model '{e.model_id}' not found" if isinstance(e, UnknownModel) else err.message
    return web.Response(body=msgspec.json.encode({"error": message}), status=err.status,
                        content_type="application/json", headers=err.headers)


def _json(obj: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), content_type="application/json")


async def _decode(request: web.Request, kind: type[T]) -> T:
    return msgspec.json.decode(await request.read(), type=kind)


# ---- generation ------------------------------------------------------------------------
class _Turn:
    """One /api/chat or /api/generate request: its timings and its response lines."""

    def __init__(self, name: str, is_chat: bool) -> None:
        self.name, self.is_chat = name, is_chat
        self.start = self.loaded = self.first = time.perf_counter_ns()

    def line(self, text: str, done: bool = False, calls: list[Call] | None = None,
             **stats: Any) -> Response:
        wire = [ToolCall(CallFunction(c.name, c.arguments)) for c in calls] if calls else None
        message = AssistantMessage("assistant", text, wire) if self.is_chat else None
        return Response(model=self.name, created_at=timestamp(), message=message,
                        response=None if self.is_chat else text, done=done, **stats)

    def final(self, text: str, last: Delta, calls: list[Call] | None = None) -> Response:
        end = time.perf_counter_ns()
        usage = last.usage
        reason = "stop" if last.finish_reason == "tool_calls" else last.finish_reason
        return self.line(
            text, True, calls, done_reason=reason,
            total_duration=max(1, end - self.start), load_duration=max(1, self.loaded - self.start),
            # The tokens actually evaluated: those found in the prefix cache were not.
            prompt_eval_count=usage.prompt_tokens - usage.cached_tokens if usage else 0,
            prompt_eval_duration=max(1, self.first - self.loaded),
            eval_count=usage.completion_tokens if usage else 0,
            eval_duration=max(1, end - self.first))


async def chat(request: web.Request) -> web.StreamResponse:
    req = await _decode(request, ChatRequest)
    es = request.app[SERVER]
    model = model_id(es.store, req.model)
    keep_alive = keep_alive_seconds(req.keep_alive)
    sampling = _checked(req.options.sampling()) | {"grammar": format_grammar(req.format)}
    turn = _Turn(req.model, is_chat=True)
    if not req.messages:
        return await _load_only(es, model, keep_alive, turn)
    messages = [m.to_dict() for m in req.messages]
    return await _run(request, es, model, turn, req.stream, keep_alive,
                      lambda: es.stream_chat(model, messages, tools=req.tools,
                                             **_bounded(es, model, sampling)))


async def generate(request: web.Request) -> web.StreamResponse:
    req = await _decode(request, GenerateRequest)
    es = request.app[SERVER]
    model = model_id(es.store, req.model)
    keep_alive = keep_alive_seconds(req.keep_alive)
    sampling = _checked(req.options.sampling()) | {"grammar": format_grammar(req.format)}
    turn = _Turn(req.model, is_chat=False)
    if not req.prompt and not req.system:
        return await _load_only(es, model, keep_alive, turn)

    def start() -> Deltas:
        options = _bounded(es, model, sampling)
        tokenizer = es.tokenizer(model)
        if req.raw or tokenizer is None or not tokenizer.has_chat_template:
            prompt = f"{req.system}\n\n{req.prompt}" if req.system and not req.raw else req.prompt
            return es.stream_complete(model, prompt, **options)
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": req.prompt})
        return es.stream_chat(model, messages, **options)

    return await _run(request, es, model, turn, req.stream, keep_alive, start)


def _checked(sampling: dict[str, Any]) -> dict[str, Any]:
    """Validate before any work, naming options as Ollama does."""
    try:
        SamplingParams.from_options(**sampling)
    except SamplingError as e:
        name = "num_predict" if e.param == "max_tokens" else e.param
        raise InvalidRequest(f"options.{name}: {str(e).removeprefix(e.param + ': ')}",
                             name) from e
    return sampling


def _bounded(es: EdgeServer, model: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """num_predict -1 or absent: a default that the model's context bounds."""
    if sampling["max_tokens"] is not None:
        return sampling
    resident = es.models.get(model)
    context = resident.spec.max_positions if resident is not None else DEFAULT_NUM_PREDICT
    return {**sampling, "max_tokens": min(DEFAULT_NUM_PREDICT, context)}


async def _load_only(es: EdgeServer, model: str, keep_alive: float | None, turn: _Turn
                     ) -> web.Response:
    """An empty request loads the model; with keep_alive 0 it unloads it instead."""
    if keep_alive == 0:
        if model in es.models:
            es.keep_alive(model, 0)         # a pinned model stays
        return _json(turn.line("", True, done_reason="unload"))
    await es.load(model)
    _keep(es, model, keep_alive)
    return _json(turn.line("", True, done_reason="load"))


def _keep(es: EdgeServer, model: str, keep_alive: float | None) -> None:
    if keep_alive is not None and model in es.models:
        es.keep_alive(model, keep_alive)


async def _run(request: web.Request, es: EdgeServer, model: str, turn: _Turn, stream: bool,
               keep_alive: float | None, start: Callable[[], Deltas]) -> web.StreamResponse:
    try:
        await es.load(model)
        turn.loaded = time.perf_counter_ns()
        deltas = start()
        try:
            # The first piece comes before the headers, so that a request the server
            # refuses (bad prompt, no memory, busy) still gets its own HTTP status.
            first = await anext(deltas)
            turn.first = time.perf_counter_ns()
            if stream:
                return await _stream(request, turn, first, deltas)
            text, last, calls = [first.text], first, list(first.tool_calls or [])
            while not last.finish_reason:
                last = await anext(deltas)
                text.append(last.text)
                calls.extend(last.tool_calls or [])
            return _json(turn.final("".join(text), last, calls))
        finally:
            await deltas.aclose()
    finally:
        _keep(es, model, keep_alive)        # after the request, as Ollama does


async def _stream(request: web.Request, turn: _Turn, delta: Delta, rest: Deltas
                  ) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        while True:
            if delta.text or delta.tool_calls:
                await resp.write(_ndjson(turn.line(delta.text, calls=delta.tool_calls)))
            if delta.finish_reason:
                await resp.write(_ndjson(turn.final("", delta)))
                break
            delta = await anext(rest)
    except ConnectionError:
        pass            # the client left; closing the deltas cancels the sequence
    except Exception as e:
        with contextlib.suppress(ConnectionError):
            await resp.write(msgspec.json.encode({"error": str(api_error(e).message)}) + b"\n")
    return resp


def _ndjson(obj: Any) -> bytes:
    return msgspec.json.encode(obj) + b"\n"


# ---- models ----------------------------------------------------------------------------
def _entry(model: StoredModel, about: Description) -> dict[str, Any]:
    return {"name": model.id, "model": model.id, "modified_at": from_epoch(model.created),
            "size": model.size_bytes, "digest": digest(model.id, model.size_bytes),
            "details": about.details}


def _catalogue(store: ModelStore, only: set[str] | None = None
               ) -> list[tuple[StoredModel, Description]]:
    return [(m, describe_tagged(m.path, m.tag)) for m in store.list()
            if only is None or m.id in only]


async def tags(request: web.Request) -> web.Response:
    models = await asyncio.to_thread(_catalogue, request.app[SERVER].store)
    return _json({"models": [_entry(m, about) for m, about in models]})


async def ps(request: web.Request) -> web.Response:
    es = request.app[SERVER]
    stored = await asyncio.to_thread(_catalogue, es.store, set(es.models))
    devices = es.stats()["devices"]
    running = []
    for model, about in stored:
        by_device = {d: s["resident_models"][model.id] for d, s in devices.items()
                     if model.id in s["resident_models"]}
        running.append({
            **_entry(model, about), "size": sum(by_device.values()),
            "size_vram": sum(n for d, n in by_device.items() if d.startswith("cuda")),
            "expires_at": in_seconds(_expires_in(es, model.id)),
            "context_length": about.context_length, "devices": by_device,
            "pinned": _pinned(es, model.id)})
    return _json({"models": running})


def _pinned(es: EdgeServer, model: str) -> bool:
    state = es.scheduler.residency.get(model)
    return state is not None and state.pinned


def _expires_in(es: EdgeServer, model: str) -> float | None:
    """Seconds until keep-alive unloads the model; None: never."""
    state = es.scheduler.residency.get(model)
    if state is None or state.pinned or state.keep_alive is None:
        return None
    if state.timer is None or state.timer.cancelled():
        return state.keep_alive         # a request is running: the timer starts after it
    return max(0.0, state.timer.when() - asyncio.get_running_loop().time())


async def show(request: web.Request) -> web.Response:
    req = await _decode(request, ShowRequest)
    store = request.app[SERVER].store
    model = model_id(store, req.model or req.name)
    path = await asyncio.to_thread(store.prepare, model)      # a GGUF file: its folder
    about = await asyncio.to_thread(describe_tagged, path, split_tag(model)[1])
    body: dict[str, Any] = {
        "modelfile": f"# Modelfile generated by edgeserve\nFROM {model}\n",
        "parameters": about.parameters, "details": about.details,
        "model_info": about.model_info,
        # Clients check "tools" before sending tools: a template that renders them.
        "capabilities": ["completion"] + (["tools"] if "tools" in (about.template or "") else []),
        "modified_at": from_epoch(path.stat().st_mtime)}
    if about.template is not None:
        body["template"] = about.template
    return _json(body)


async def version(request: web.Request) -> web.Response:
    return _json({"version": edgeserve.__version__})
