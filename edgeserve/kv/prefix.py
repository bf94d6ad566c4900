"""Prefix keys: a full KV page is named by everything that decides its values.

    identity  = H(model spec, compute dtype, page size, weight unit keys, task blocks)
    key(0)    = H(identity, "",       tokens of page 0)
    key(i)    = H(identity, key(i-1), tokens of page i)

So a page is found again only by a sequence with the same tokens before it and in it, on
a model computing with the same bytes: a fine-tune whose attention weights differ from its
base's never reads its base's pages, and a model unloaded and loaded again (same weights,
same keys) finds its pages where it left them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

PREFIX = b"edgeserve-kv-1|"


def kv_identity(parts: Iterable[str]) -> str:
    """One key for everything that changes a model's KV (in a fixed order)."""
    h = hashlib.blake2b(PREFIX, digest_size=16)
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def page_key(identity: str, previous: str, tokens: list[int]) -> str:
    h = hashlib.blake2b(PREFIX, digest_size=16)
    h.update(identity.encode())
    h.update(previous.encode())
    h.update(array("q", tokens).tobytes())
    return h.hexdigest()


@dataclass(slots=True)
class PrefixState:
    """One sequence's place in the prefix index."""

    keys: list[str] = field(default_factory=list)   # of its full pages, in order
    published: int = 0          # pages [0, published) are under their keys (or private dups)
    exact_pages: int | None = None  # later pages hold inexact KV (expert substitution)
    intents: list[str] = field(default_factory=list)    # keys it will compute, announced
    cached_prompt: int = 0      # prompt tokens found at its first admission
    queried: bool = False       # its first admission has been counted

    def extend(self, identity: str, tokens: list[int], page_tokens: int) -> list[str]:
        """Keys of every full page of `tokens` (computed once, extended as tokens come)."""
        for i in range(len(self.keys), len(tokens) // page_tokens):
            previous = self.keys[i - 1] if i else ""
            self.keys.append(page_key(identity, previous,
                                      tokens[i * page_tokens:(i + 1) * page_tokens]))
        return self.keys
