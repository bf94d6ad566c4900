"""The HTTP server: an aiohttp app with OpenAI-compatible routes over an EdgeServer."""

from edgeserve.server.app import SERVER, ApiError, create_app, serve

__all__ = ["SERVER", "ApiError", "create_app", "serve"]
