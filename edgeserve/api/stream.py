"""One request's life inside EdgeServer: checked, submitted to the engine, its events
turned into deltas on the caller's event loop, cancelled if the caller stops reading."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from edgeserve.constrain import start_grammar
from edgeserve.mailbox import Mailbox
from edgeserve.request_timer import RequestTimer
from edgeserve.requests import check_prompt
from edgeserve.results import (
    Completion,
    Delta,
    GenerationError,
    ServerClosing,
    TokenLogprob,
    Usage,
)
from edgeserve.sampling import SamplingParams
from edgeserve.sequence import Event, Sequence, Status

if TYPE_CHECKING:
    from edgeserve.api import EdgeServer


async def stream(server: EdgeServer, model_id: str, prompt: list[int], params: SamplingParams
                 ) -> AsyncGenerator[Delta, None]:
    """The deltas of one generation of model_id over prompt (token ids)."""
    if server._closing:
        raise ServerClosing("the server is shutting down")
    scheduler = server.scheduler
    scheduler.request_started(model_id)
    model = await scheduler.ready(model_id, server.load)
    check_prompt(model, prompt, params)
    grammar = None
    if params.grammar is not None:      # compiled once per schema, off the event loop
        grammar = await asyncio.to_thread(start_grammar, params.grammar,
                                          server._require_tokenizer(model_id), model)
    loop = asyncio.get_running_loop()
    mailbox = server._mailboxes.get(loop)
    if mailbox is None:
        mailbox = server._mailboxes[loop] = Mailbox(loop)
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:     # called on the step thread
        mailbox.post(queue, event)

    seq = Sequence(next(server._ids), model, prompt, params, sink,
                   tokenizer=server.tokenizer(model_id), grammar=grammar)
    server._engine.submit(seq)
    timer = RequestTimer(server.metrics, model_id, seq)
    try:
        while True:
            event = await queue.get()
            if event.error is not None:
                raise GenerationError(str(event.error)) from event.error
            timer.tokens(len(event.token_ids))
            usage = (Usage(event.prompt_tokens, event.completion_tokens,
                           event.cached_tokens) if event.finish_reason else None)
            if event.finish_reason:
                timer.finish(event)
            yield Delta(event.text, event.token_ids, event.finish_reason, usage,
                        event.logprobs)
            if event.finish_reason:
                return
    finally:
        if seq.status is not Status.FINISHED and server.engine is not None:
            server.engine.cancel(seq)
        if server._scheduler is not None:
            server._scheduler.request_ended(model_id)


async def collect(deltas: AsyncIterator[Delta]) -> Completion:
    """A whole completion out of its deltas."""
    text, ids, calls = [], [], []
    logprobs: list[TokenLogprob] | None = None
    async for delta in deltas:
        text.append(delta.text)
        ids.extend(delta.token_ids)
        calls.extend(delta.tool_calls or [])
        if delta.logprobs is not None:
            logprobs = (logprobs or []) + delta.logprobs
        if delta.finish_reason and delta.usage:
            return Completion("".join(text), ids, delta.finish_reason, delta.usage,
                              logprobs, calls or None)
    raise GenerationError("the stream ended without a finish reason")
