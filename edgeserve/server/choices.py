"""Several generations of one request, run at once and read as one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from edgeserve.results import Delta, InvalidRequest, TokenLogprob, ToolCall, Usage

_Item = tuple[int, Delta | Exception]


@dataclass(frozen=True, slots=True)
class Gathered:
    """One whole choice, for answers that are not streamed."""

    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    tool_calls: list[ToolCall] | None = None


class Choices:
    """The deltas of `streams` as (choice index, Delta), in the order they arrive.

    Each stream runs in its own task, so that the sequences decode in the same engine
    steps. Iteration ends once every choice has its finish delta; an error of any
    choice is raised. aclose() cancels what still runs: the engine drops those
    sequences at its next step. `prompt_of[i]` says which prompt choice i completes,
    so that usage counts each prompt once. `renamed` maps the engine's parameter names
    to the request's (the prompt of a chat is its messages).
    """

    def __init__(self, streams: list[AsyncIterator[Delta]], prompt_of: list[int],
                 renamed: dict[str, str] | None = None) -> None:
        self.n = len(streams)
        self._prompt_of, self._renamed = prompt_of, renamed or {}
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._usage: dict[int, Usage] = {}
        self._streams = streams
        self._tasks: list[asyncio.Task[None]] = []
        self._direct: AsyncIterator[Delta] | None = None

    def read_directly(self) -> None:
        """Read a single choice straight from its stream: no task and no second queue per
        token. Only for callers that never cancel a pending read (a timeout on anext would
        close the stream)."""
        if self.n == 1 and not self._tasks:
            self._direct = self._streams[0]

    def _start(self) -> None:
        if not self._tasks and self._direct is None:
            self._tasks = [asyncio.create_task(self._pump(i, s))
                           for i, s in enumerate(self._streams)]

    async def _pump(self, index: int, stream: AsyncIterator[Delta]) -> None:
        # A cancellation lands inside the stream, whose own clean-up cancels the sequence.
        try:
            async for delta in stream:
                self._queue.put_nowait((index, delta))
        except Exception as e:
            self._queue.put_nowait((index, self._rename(e)))

    def _rename(self, e: Exception) -> Exception:
        if isinstance(e, InvalidRequest) and e.param in self._renamed:
            name, message = self._renamed[e.param], str(e)
            if message.startswith(e.param + " "):     # the message names it first
                message = name + message.removeprefix(e.param)
            renamed = InvalidRequest(message, name)
            renamed.__cause__ = e
            return renamed
        return e

    def __aiter__(self) -> Choices:
        return self

    async def __anext__(self) -> tuple[int, Delta]:
        if len(self._usage) == self.n:
            raise StopAsyncIteration
        if self._direct is not None:
            try:
                index, item = 0, await anext(self._direct)
            except StopAsyncIteration:
                raise RuntimeError("the stream ended without a finish reason") from None
            except Exception as e:
                raise self._rename(e) from e
        else:
            self._start()
            index, queued = await self._queue.get()
            if isinstance(queued, Exception):
                raise queued
            item = queued
        if item.finish_reason is not None and item.usage is not None:
            self._usage[index] = item.usage
        return index, item

    async def gather(self) -> list[Gathered]:
        """Every choice whole (a non-streamed answer); nothing here cancels a read."""
        texts: list[list[str]] = [[] for _ in range(self.n)]
        logprobs: list[list[TokenLogprob] | None] = [None] * self.n
        reasons: list[str | None] = [None] * self.n
        calls: list[list[ToolCall]] = [[] for _ in range(self.n)]
        self.read_directly()
        async for i, delta in self:
            texts[i].append(delta.text)
            calls[i].extend(delta.tool_calls or [])
            if delta.logprobs is not None:
                logprobs[i] = (logprobs[i] or []) + delta.logprobs
            reasons[i] = delta.finish_reason
        return [Gathered("".join(texts[i]), logprobs[i], reasons[i], calls[i] or None)
                for i in range(self.n)]

    def usage(self) -> Usage:
        """The usage of the finished choices: each prompt once, every completion."""
        prompts = {self._prompt_of[i]: u for i, u in self._usage.items()}
        return Usage(sum(u.prompt_tokens for u in prompts.values()),
                     sum(u.completion_tokens for u in self._usage.values()),
                     sum(u.cached_tokens for u in prompts.values()))

    async def aclose(self) -> None:
        if self._direct is not None or not self._tasks:
            # Read directly, or never read: close the streams themselves (closing a stream
            # cancels its sequence).
            for stream in [self._direct] if self._direct is not None else self._streams:
                close = getattr(stream, "aclose", None)
                if close is not None:
                    await close()
        for task in self._tasks:
            task.cancel()
        # Their cancellations come back as results; one of the caller's own still raises.
        await asyncio.gather(*self._tasks, return_exceptions=True)
