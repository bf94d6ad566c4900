"""Admin routes: load, unload, pin, pool state, metrics.

Errors take the OpenAI shape of the app's error middleware (an unknown id is a 404).
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from edgeserve.metrics import CONTENT_TYPE
from edgeserve.server.app import SERVER


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/models/{id}/load", load)
    app.router.add_post("/admin/models/{id}/unload", unload)
    app.router.add_post("/admin/models/{id}/pin", pin)
    app.router.add_post("/admin/models/{id}/unpin", unpin)
    app.router.add_get("/admin/pool", pool)
    app.router.add_post("/admin/prefix-cache/reset", reset_prefix_cache)
    app.router.add_get("/metrics", metrics)


def _json(obj: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), content_type="application/json")


async def load(request: web.Request) -> web.Response:
    """Make the model resident; the LoadReport says where its bytes came from and why it
    went to its device. `device` (query, or a JSON body {"device": ...}) overrides placement."""
    device = request.query.get("device")
    if device is None and request.can_read_body:
        body = msgspec.json.decode(await request.read() or b"{}", type=_LoadBody)
        device = body.device
    report = await request.app[SERVER].load(request.match_info["id"], device)
    return _json(report)


class _LoadBody(msgspec.Struct):
    device: str | None = None


async def unload(request: web.Request) -> web.Response:
    """Stop serving the model once its running requests end (its units may stay cached)."""
    model = request.match_info["id"]
    await request.app[SERVER].unload(model)
    return _json({"model": model, "resident": False})


async def pin(request: web.Request) -> web.Response:
    """Keep the model resident: keep-alive never unloads it, pool pressure never evicts it."""
    return _set_pin(request, True)


async def unpin(request: web.Request) -> web.Response:
    return _set_pin(request, False)


def _set_pin(request: web.Request, pinned: bool) -> web.Response:
    es, model = request.app[SERVER], request.match_info["id"]
    es.pin(model, pinned)
    return _json({"model": model, "pinned": pinned, "resident": model in es.models})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """Drop every retained KV page (devices and host tier); running requests keep theirs."""
    dropped = await request.app[SERVER].reset_prefix_cache()
    return _json({"dropped_pages": dropped})


async def pool(request: web.Request) -> web.Response:
    return _json(request.app[SERVER].stats())


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
