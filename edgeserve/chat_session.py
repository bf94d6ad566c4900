"""`edgeserve chat MODEL`: a conversation in the terminal, with a server in this process or
one at --url."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from edgeserve.cli import edge_server
from edgeserve.results import GenerationError

Replier = Callable[[list[dict[str, str]]], AsyncIterator[str]]


class ChatFailed(Exception):
    """A turn that failed; the conversation goes on."""


@contextlib.asynccontextmanager
async def _local_replies(args: argparse.Namespace, sampling: dict[str, Any]
                         ) -> AsyncIterator[Replier]:
    async with edge_server(args) as server:
        await server.load(args.model)       # fail now, not at the first message

        async def reply(messages: list[dict[str, str]]) -> AsyncIterator[str]:
            try:
                async for delta in server.stream_chat(args.model, messages, **sampling):
                    yield delta.text
            except (ValueError, GenerationError) as e:
                raise ChatFailed(str(e)) from e

        yield reply


@contextlib.asynccontextmanager
async def _remote_replies(args: argparse.Namespace, sampling: dict[str, Any]
                          ) -> AsyncIterator[Replier]:
    import aiohttp

    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{url}/v1/models/{args.model}") as resp:
            if resp.status != 200:      # fail now, not at the first message
                raise LookupError(f"{url}: {await _error_text(resp)}")

        async def reply(messages: list[dict[str, str]]) -> AsyncIterator[str]:
            body = {"model": args.model, "messages": messages, "stream": True, **sampling}
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                    if resp.status != 200:
                        raise ChatFailed(await _error_text(resp))
                    async for line in resp.content:
                        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                            continue
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise ChatFailed(event["error"].get("message", "error"))
                        for choice in event.get("choices", []):
                            yield choice.get("delta", {}).get("content") or ""
            except aiohttp.ClientError as e:
                raise ChatFailed(f"{url}: {e}") from e

        yield reply


async def _error_text(resp: Any) -> str:
    try:
        return str((await resp.json())["error"]["message"])
    except Exception:       # not our error shape: say what came back
        return f"HTTP {resp.status} {resp.reason}"


async def _read_line(prompt: str) -> str | None:
    """One line of stdin (None at EOF), read on a daemon thread so Ctrl-C never waits."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str | None] = loop.create_future()

    def settle(line: str | None) -> None:
        if not future.done():
            future.set_result(line)

    def read() -> None:
        try:
            line: str | None = input(prompt)
        except EOFError:
            line = None
        with contextlib.suppress(RuntimeError):     # the loop may be gone
            loop.call_soon_threadsafe(settle, line)

    threading.Thread(target=read, daemon=True, name="edgeserve-stdin").start()
    return await future


async def chat_session(args: argparse.Namespace) -> int:
    sampling = {k: v for k, v in (("max_tokens", args.max_tokens),
                                  ("temperature", args.temperature)) if v is not None}
    replies = _remote_replies if args.url else _local_replies
    history = [{"role": "system", "content": args.system}] if args.system else []
    prompt = ">>> " if sys.stdin.isatty() else ""
    async with replies(args, sampling) as reply:
        while (line := await _read_line(prompt)) is not None and line.strip() != "/exit":
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            pieces: list[str] = []
            try:
                async for text in reply(history):
                    print(text, end="", flush=True)
                    pieces.append(text)
            except ChatFailed as e:
                print(f"\nerror: {e}", file=sys.stderr)
                history.pop()
                continue
            print(flush=True)
            history.append({"role": "assistant", "content": "".join(pieces)})
    return 0
