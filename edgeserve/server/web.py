"""The web page and the routes that feed it.

    GET /                          the page (chat, pool map, events, numbers)
    GET /ui/{file}                 its scripts and styles, shipped in edgeserve/web/
    GET /admin/live                the live feed (server-sent events, see live.py)
    GET /admin/events?since=N      the event log as JSON
    GET /admin/units/{device}/{id} one pool unit in detail

The page and its assets hold nothing of the store, so they are open without the API key;
everything else behind them asks for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from aiohttp import web

from edgeserve.events import EventLog
from edgeserve.server import board, live
from edgeserve.server.app import SERVER, ApiError, invalid

ASSETS = Path(__file__).resolve().parent.parent / "web"
EVENTS = web.AppKey("edgeserve.events", EventLog)
FEED = web.AppKey("edgeserve.live_feed", live.LiveFeed)
PUBLIC_PREFIX = "/ui/"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static(PUBLIC_PREFIX, ASSETS, append_version=False)
    app.router.add_get("/admin/live", live_feed)
    app.router.add_get("/admin/events", events)
    app.router.add_get("/admin/units/{device}/{id}", unit)
    app.cleanup_ctx.append(_feed_ctx)      # after the server's: its pools exist by then
    app.on_shutdown.append(_close_feed)
    app.on_response_prepare.append(_revalidate)


async def _revalidate(request: web.Request, response: web.StreamResponse) -> None:
    # The page's files change with the package: browsers ask again (a 304 when unchanged).
    if request.path.startswith(PUBLIC_PREFIX):
        response.headers["Cache-Control"] = "no-cache"


def is_public(path: str) -> bool:
    return path == "/" or path.startswith(PUBLIC_PREFIX)


async def _feed_ctx(app: web.Application) -> AsyncIterator[None]:
    es = app[SERVER]
    log = app[EVENTS] = EventLog()
    log.attach(es.pools.values())
    app[FEED] = live.LiveFeed(es, log)
    try:
        yield
    finally:
        await app[FEED].close()
        log.detach(es.pools.values())


async def _close_feed(app: web.Application) -> None:
    if FEED in app:
        await app[FEED].close()        # ends the open streams: shutdown need not wait


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache"})


async def live_feed(request: web.Request) -> web.StreamResponse:
    return await live.stream(request, request.app[FEED])


async def events(request: web.Request) -> web.Response:
    """Events numbered above `since` (default 0), oldest first, at most `limit`."""
    try:
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "0")) or None
    except ValueError:
        raise invalid("since and limit are integers", "since") from None
    log = request.app[EVENTS]
    body = {"last_seq": log.last_seq, "events": [e.to_json() for e in log.since(since, limit)]}
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


async def unit(request: web.Request) -> web.Response:
    es = request.app[SERVER]
    pool = es.pools.get(request.match_info["device"])
    try:
        found = pool.units.get(int(request.match_info["id"])) if pool is not None else None
    except ValueError:
        found = None
    if pool is None or found is None:
        raise ApiError(404, f"no unit {request.match_info['id']} on device "
                       f"{request.match_info['device']!r} (it may have been evicted)",
                       code="not_found")
    return web.Response(body=msgspec.json.encode(board.unit_detail(es, pool, found)),
                        content_type="application/json")
