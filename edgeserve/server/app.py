"""The aiohttp application: factory, shared state, and errors in OpenAI's shape.

Every error leaves the server as {"error": {"message", "type", "param", "code"}}:
handlers raise, and the error middleware maps the exception to a status and a body
(api_error). Streaming handlers use the same mapping for errors after the headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import signal
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from edgeserve.api import EdgeServer
from edgeserve.arch.spec import ModelFormatError
from edgeserve.engine import QueueFull
from edgeserve.pool import PoolFull
from edgeserve.results import GenerationError, InvalidRequest, ServerClosing
from edgeserve.sampling import SamplingError
from edgeserve.server.wire import ErrorBody, ErrorDetail, encode
from edgeserve.store import UnknownModel
from edgeserve.tokenizer import ChatTemplateError

log = logging.getLogger("edgeserve.server")

SERVER = web.AppKey("edgeserve.server", EdgeServer)
SHUTDOWN_DEADLINE = web.AppKey("edgeserve.shutdown_deadline", float)
MAX_BODY = 8 << 20
PUBLIC_PATHS = frozenset({"/health"})     # answered without the API key


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> bytes:
        return encode(ErrorBody(ErrorDetail(self.message, self.type, self.param, self.code)))

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body(),
                            content_type="application/json", headers=self.headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# msgspec names the offending place as "... - at `$.messages[0].role`".
_AT_RE = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def _decode_error(e: msgspec.DecodeError) -> ApiError:
    message = str(e)
    if not isinstance(e, msgspec.ValidationError):
        return invalid(f"the request body is not valid JSON: {message}")
    at = _AT_RE.search(message)
    path = at.group(1) if at else ""
    missing = _MISSING_RE.search(message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return invalid(message, path or None)


def api_error(e: Exception) -> ApiError:
    """The OpenAI-shaped error for an exception; unexpected ones become a logged 500."""
    match e:
        case ApiError():
            return e
        case msgspec.DecodeError():
            return _decode_error(e)
        case SamplingError() | InvalidRequest():
            return invalid(str(e), e.param)
        case ChatTemplateError():
            return invalid(str(e), "messages")
        case UnknownModel():
            return ApiError(404, f"The model '{e.model_id}' does not exist",
                            param="model", code="model_not_found")
        case ServerClosing():
            return ApiError(503, str(e), type="server_error", code="shutting_down",
                            headers={"Retry-After": "5"})
        case QueueFull():
            return ApiError(503, f"the server is busy: {e}", type="server_error",
                            code="queue_full", headers={"Retry-After": "1"})
        case PoolFull():
            return _no_memory(e)
        case GenerationError() if isinstance(e.__cause__, PoolFull):
            return _no_memory(e.__cause__)
        case ModelFormatError():
            log.error("cannot serve a model: %s", e)
            return ApiError(500, f"the model cannot be served: {e}", type="server_error",
                            code="model_format_error")
        case web.HTTPError():
            return _http_error(e, None)
    log.error("request failed", exc_info=e)
    return ApiError(500, "internal server error", type="server_error")


def _no_memory(e: PoolFull) -> ApiError:
    # The pool cannot hold this now (models or KV of other requests); it may later.
    return ApiError(503, f"not enough memory: {e}", type="server_error",
                    code="insufficient_memory", headers={"Retry-After": "5"})


def _http_error(e: web.HTTPError, request: web.Request | None) -> ApiError:
    # Keep e.g. Allow of a 405; the body and its headers are ours.
    headers = {k: v for k, v in e.headers.items()
               if k.lower() not in ("content-type", "content-length")}
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
    message = e.text or e.reason
    if request is not None and e.status in (404, 405):
        message = f"{e.reason}: {request.method} {request.path}"
    return ApiError(e.status, message, type=kind, code=code, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if not isinstance(e, web.HTTPError):
            raise       # redirects and the like pass through
        return _http_error(e, request).response()
    except Exception as e:
        return api_error(e).response()


def auth_middleware(api_key: str) -> Middleware:
    from edgeserve.server.web import is_public  # the page and its assets: nothing secret

    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS and not is_public(request.path):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "Incorrect or missing API key: send 'Authorization: "
                               "Bearer <key>'", code="invalid_api_key")
        return await handler(request)

    return check_key


async def _server_ctx(app: web.Application) -> AsyncIterator[None]:
    server = app[SERVER]
    await server.start()
    try:
        yield
    finally:
        await server.close()


async def _drain(app: web.Application) -> None:
    # on_shutdown runs once the listening sockets are closed and before aiohttp waits
    # for the handlers: new requests get 503, running ones get until the deadline.
    await app[SERVER].shutdown(app[SHUTDOWN_DEADLINE])


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(server: EdgeServer, *, api_key: str | None = None,
               client_max_size: int = MAX_BODY, shutdown_deadline: float = 10.0
               ) -> web.Application:
    """The HTTP app; it starts `server` on start-up, and on shutdown lets running
    requests finish for up to `shutdown_deadline` seconds before closing it."""
    # the route modules import SERVER from here
    from edgeserve.server import admin, ollama, openai
    from edgeserve.server import web as page

    middlewares: list[Middleware] = [error_middleware]
    if api_key:
        middlewares.append(auth_middleware(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    app[SERVER] = server
    app[SHUTDOWN_DEADLINE] = shutdown_deadline
    app.cleanup_ctx.append(_server_ctx)
    app.on_shutdown.append(_drain)
    app.router.add_get("/health", health)
    openai.add_routes(app)
    ollama.add_routes(app)
    admin.add_routes(app)
    page.add_routes(app)
    return app


def url_of(address: Any) -> str:
    """http://host:port of a bound socket address (IPv6 hosts in brackets)."""
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve app on host:port (0: any free port) until SIGINT or SIGTERM."""
    # aiohttp waits for the handlers a little past the deadline: they end the streams.
    # A client that disconnects cancels its handler, and so its sequences.
    # One access line per request costs the event loop time on a busy box: debug only.
    access = logging.getLogger("aiohttp.access")
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=app[SHUTDOWN_DEADLINE] + 5,
                           access_log=access if access.isEnabledFor(logging.DEBUG) else None)
    await runner.setup()            # starts the EdgeServer (cleanup_ctx)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        store = app[SERVER].store
        log.info("edgeserve ready on %s (%d models in %s)", url_of(runner.addresses[0]),
                 len(await asyncio.to_thread(store.list)), store.root)
        await _until_signalled()
    finally:
        await runner.cleanup()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        with contextlib.suppress(NotImplementedError):    # no signal handlers on Windows
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
