"""Log-probabilities in OpenAI's two formats: chat (per-token objects) and completions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgeserve.api import EdgeServer
from edgeserve.results import TokenLogprob
from edgeserve.server.wire import ChoiceLogprobs, CompletionLogprobs, TopLogprob
from edgeserve.server.wire import TokenLogprob as WireLogprob

# What OpenAI sends for a token too unlikely to have a finite log-probability.
FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > FLOOR else FLOOR


class TokenText:
    """Token id -> its text by the model's tokenizer, special tokens spelled out."""

    def __init__(self, server: EdgeServer, model: str) -> None:
        self.server, self.model = server, model
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            # Looked up late: the tokenizer exists once the model is resident.
            tokenizer = self.server.tokenizer(self.model)
            text = (tokenizer.decode([token_id], skip_special_tokens=False)
                    if tokenizer is not None else f"token_id:{token_id}")
            self._texts[token_id] = text
        return text

    def bytes(self, token_id: int) -> list[int]:
        return list(self(token_id).encode("utf-8", "replace"))


def chat_logprobs(items: Sequence[TokenLogprob], text: TokenText) -> ChoiceLogprobs:
    content = [WireLogprob(text(t.token_id), _finite(t.logprob), text.bytes(t.token_id),
                           [TopLogprob(text(i), _finite(lp), text.bytes(i)) for i, lp in t.top])
               for t in items]
    return ChoiceLogprobs(content)


class CompletionLogprobBuilder:
    """Completions-style log-probabilities of one choice, chunk after chunk.

    text_offset counts characters from the start of the completion, across chunks.
    """

    def __init__(self, text: TokenText) -> None:
        self.text, self.offset = text, 0

    def __call__(self, items: Sequence[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs([], [], [], [])
        for t in items:
            token = self.text(t.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(_finite(t.logprob))
            # The top alternatives and, as in vLLM, the chosen token itself.
            top = {self.text(i): _finite(lp) for i, lp in t.top}
            top.setdefault(token, _finite(t.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(token)
        return out
