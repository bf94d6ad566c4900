"""Request state: one Sequence per generation, owned by the engine's worker thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from edgeserve.constrain import GrammarState
from edgeserve.kv import PrefixState
from edgeserve.model import ResidentModel
from edgeserve.pool import Unit
from edgeserve.results import TokenLogprob
from edgeserve.sampling import SamplingParams, make_generator
from edgeserve.stops import StopMatcher
from edgeserve.tokenizer import IncrementalDetokenizer, Tokenizer


class Status(Enum):
    WAITING = "waiting"      # no KV yet (new, or preempted and to be recomputed)
    RUNNING = "running"      # holds pages; `cached` tokens of KV are in them
    FINISHED = "finished"


@dataclass(slots=True)
class Event:
    """What one step produced for one sequence, sent to the request's coroutine."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: BaseException | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None    # one per token id, when asked for
    cached_tokens: int = 0      # prompt tokens whose KV was found, not computed


@dataclass(eq=False)
class Sequence:
    id: int
    model: ResidentModel
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], object]      # thread-safe: hands events to the event loop
    tokenizer: Tokenizer | None = None
    output: list[int] = field(default_factory=list)
    pages: list[Unit] = field(default_factory=list)
    cached: int = 0                      # tokens whose keys/values are in `pages`
    prefix: PrefixState = field(default_factory=PrefixState)   # its pages' keys (reuse)
    sampled: int = 0                     # tokens sampled, the final stop token included
    status: Status = Status.WAITING
    finish_reason: str | None = None
    cancelled: bool = False
    arrival: float = field(default_factory=time.monotonic)
    started_at: float | None = None      # first admitted to run
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    grammar: GrammarState | None = None   # the output's grammar (the engine masks its logits)
    stops: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.generator = make_generator(self.params, self.model.pool.device)
        self.stops = StopMatcher(self.params.stop)
        if self.tokenizer is not None:
            self.detok = IncrementalDetokenizer(self.tokenizer, self.prompt)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def pending(self, limit: int) -> list[int]:
        """The next tokens whose KV is missing (at most `limit`)."""
        start, n_prompt = self.cached, len(self.prompt)
        if start >= n_prompt:
            return self.output[start - n_prompt:start - n_prompt + limit]
        return (self.prompt + self.output)[start:start + limit]

    def accept(self, token: int, eos: frozenset[int],
               logprob: TokenLogprob | None = None) -> Event:
        """Take a sampled token; decide whether the sequence ends here."""
        event = self._accept(token, eos)
        if self.params.logprobs is not None:
            event.logprobs = [logprob] if event.token_ids and logprob is not None else []
        return event

    def _accept(self, token: int, eos: frozenset[int]) -> Event:
        self.sampled += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        p = self.params
        if (token in eos and not p.ignore_eos) or token in p.stop_token_ids or \
                (self.grammar is not None and self.grammar.complete):
            return self._finish("stop", "")
        self.output.append(token)
        text = self.detok.push(token) if self.detok is not None else ""
        text, stopped = self.stops.push(text)
        if stopped:
            return self._finish("stop", text, [token], flush=False)
        if len(self.output) >= p.max_tokens or self.length >= self.model.spec.max_positions:
            return self._finish("length", text, [token])
        return Event([token], text)

    def _finish(self, reason: str, text: str, tokens: list[int] | None = None,
                flush: bool = True) -> Event:
        if flush:   # the stream ends here: release text held back for UTF-8 or stop prefixes
            tail, stopped = self.stops.push(self.detok.flush() if self.detok else "")
            text += tail + ("" if stopped else self.stops.flush())
        self.finish_reason = reason
        self.status = Status.FINISHED
        return Event(tokens or [], text, reason, prompt_tokens=len(self.prompt),
                     completion_tokens=self.sampled, cached_tokens=self.prefix.cached_prompt)
