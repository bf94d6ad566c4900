"""POST /v1/completions: OpenAI's plain text completions, of a text or of token ids."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from edgeserve.results import Delta, TokenLogprob
from edgeserve.results import Usage as ResultUsage
from edgeserve.server import sse
from edgeserve.server.app import SERVER, invalid
from edgeserve.server.choices import Choices
from edgeserve.server.logprobs import CompletionLogprobBuilder, TokenText
from edgeserve.server.openai import check_model, checked_sampling, respond, seeded, usage
from edgeserve.server.wire import (
    MAX_CHOICES,
    CompletionChoice,
    CompletionRequest,
    TextCompletion,
    Usage,
    encode,
)

DEFAULT_MAX_TOKENS = 16     # OpenAI's default for completions

Prompt = str | list[int]


async def completions(request: web.Request) -> web.StreamResponse:
    req = msgspec.json.decode(await request.read(), type=CompletionRequest)
    server = request.app[SERVER]
    prompts = _prompts(req)
    _refuse_unsupported(req)
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
    sampling = checked_sampling(req, max_tokens, req.logprobs, {},
                                explicit=req.max_tokens is not None)
    loading = check_model(server, req.model)
    n = req.choices
    # Choice p * n + i is the i-th completion of prompt p, as in OpenAI's API.
    streams: list[AsyncIterator[Delta]] = [
        server.stream_complete(req.model, prompt, **seeded(sampling, i))
        for prompt in prompts for i in range(n)]
    choices = Choices(streams, [p for p in range(len(prompts)) for _ in range(n)])
    chunks = _CompletionChunks(req.model, TokenText(server, req.model), len(streams))
    return await respond(request, choices, chunks, _collect, stream=bool(req.stream),
                         loading=loading, include_usage=req.include_usage)


def _prompts(req: CompletionRequest) -> list[Prompt]:
    """The request's prompts: one text or token-id list, or a list of them."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif not prompt:
        raise invalid("prompt must not be empty", "prompt")
    elif all(isinstance(p, int) for p in prompt):
        prompts = [prompt]      # type: ignore[list-item]
    elif all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        prompts = prompt        # type: ignore[assignment]
    else:
        raise invalid("prompt must be a text, a list of token ids, or a list of texts or of "
                      "token-id lists (not a mixture)", "prompt")
    if len(prompts) * req.choices > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} completions per request (prompts x n), "
                      f"got {len(prompts)} x {req.choices}", "prompt")
    return prompts


def _refuse_unsupported(req: CompletionRequest) -> None:
    if req.best_of is not None and req.best_of != req.choices:
        raise invalid("best_of is not supported (other than equal to n)", "best_of")


async def _collect(choices: Choices, chunks: _CompletionChunks) -> TextCompletion:
    out = [chunks.choice(i, c.text, c.logprobs, c.finish_reason)
           for i, c in enumerate(await choices.gather())]
    return TextCompletion(chunks.id, "text_completion", chunks.created, chunks.model, out,
                          usage(choices.usage()))


class _CompletionChunks:
    """The `text_completion` chunks of one stream: one id and one `created` for all."""

    def __init__(self, model: str, text: TokenText, n: int) -> None:
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.model = model
        self._logprobs = [CompletionLogprobBuilder(text) for _ in range(n)]

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None,
               reason: str | None) -> CompletionChoice:
        converted = None if logprobs is None else self._logprobs[index](logprobs)
        return CompletionChoice(index, text, converted, reason)

    def _event(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        chunk = TextCompletion(self.id, "text_completion", self.created, self.model, choices,
                               usage)
        return sse.event(encode(chunk))

    def start(self, n: int) -> bytes:
        return b""

    def delta(self, index: int, delta: Delta) -> bytes:
        if not (delta.text or delta.logprobs or delta.finish_reason):
            return b""
        return self._event([self.choice(index, delta.text, delta.logprobs,
                                         delta.finish_reason)])

    def usage(self, u: ResultUsage) -> bytes:
        return self._event([], usage(u))
