"""Paged KV of one model on one pool, with prefix reuse.

Pages are pool units taken on demand as a sequence grows. Pages are addressed by their
first block id, so one strided view of the pool slab serves every page of the model, and
a page table is a list of block ids.

With prefix reuse, a page that fills up is published under its chain key (kv/prefix.py)
and becomes immutable. A sequence admitted later walks its prompt's keys and pins the
pages it finds (on the device, or copied back from the host tier), computing only the
rest; when a sequence ends, its published pages stay as unpinned `kv` units, evicted by
the pool's policy like any other unit. Pins are the reference counts of shared pages; a
sequence's partly filled last page (and a page whose key another page took first) is
its own and goes back when it ends.

    pages   | p0 p1 p2 | p3 | p4 (partly filled)
    key     | k0 k1 k2 | -  | -          p3: computed while another sequence published k3
    pins    | 3  3  1  | 1  | 1          p0, p1 shared with two other sequences
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from edgeserve.kv.layout import KVLayout
from edgeserve.pool import BlockPool, Unit, UnitKind

if TYPE_CHECKING:
    from edgeserve.sequence import Sequence

DEFAULT_PREFILL_RATE = 2000.0   # tokens/s assumed until a prefill has been measured


class PageSource(Protocol):
    """Where evicted pages may still be: the host tier (kv/offload.py)."""

    def restore(self, pool: BlockPool, key: str, nbytes: int, owner: str,
                cost: float) -> Unit | None: ...

    def __contains__(self, key: str) -> bool: ...


class KVCache:
    """The KV pages of one model on one pool."""

    def __init__(self, pool: BlockPool, layout: KVLayout, owner: str,
                 identity: Callable[[], str] | None = None) -> None:
        self.pool, self.layout, self.owner = pool, layout, owner
        self._identity = identity
        self.host: PageSource | None = None
        self.prefill_rate = DEFAULT_PREFILL_RATE
        self.intents: dict[str, int] = {}       # page key -> id of the sequence computing it
        self._view: torch.Tensor | None = None
        self._epoch = -1

    @property
    def view(self) -> torch.Tensor:
        """(pages addressed by block id, L, P, 2, KVH, hd) over the whole slab."""
        if self._view is None or self._epoch != self.pool.epoch:
            self._epoch = self.pool.epoch
            self._view = self.pool.paged_view(self.layout.dtype, self.layout.page_shape,
                                              self.layout.page_blocks)
        return self._view

    @property
    def identity(self) -> str:
        return self._identity() if self._identity is not None else f"private:{id(self)}"

    # ---- growth ------------------------------------------------------------------------
    def can_grow(self, pages: list[Unit], tokens: int) -> bool:
        extra = self.layout.pages_for(tokens) - len(pages)
        return extra <= 0 or self.pool.can_allocate(extra * self.layout.page_bytes)

    def grow(self, pages: list[Unit], tokens: int) -> None:
        """Append pages until `tokens` fit; raises PoolFull (keeping what was added)."""
        while len(pages) < self.layout.pages_for(tokens):
            page = self.pool.allocate(UnitKind.KV, self.layout.page_bytes, owner=self.owner)
            if self.pool.slab is not None:
                # Batched attention reads a page's unwritten slots (masked out): whatever
                # the blocks held before must not be a NaN pattern, or 0 x NaN poisons it.
                self.pool.raw(page).zero_()
            pages.append(page)

    def release(self, pages: list[Unit]) -> None:
        for page in pages:
            self.pool.release(page)
        pages.clear()

    # ---- prefix reuse --------------------------------------------------------------------
    def _keys(self, seq: Sequence) -> list[str]:
        return seq.prefix.extend(self.identity, seq.prompt + seq.output,
                                 self.layout.page_tokens)

    def _reusable(self, seq: Sequence) -> int:
        # At least the last known token is computed, so that its logits exist.
        return (seq.length - 1) // self.layout.page_tokens

    def _found(self, key: str) -> Unit | None:
        unit = self.pool.lookup(key)
        return unit if unit is not None and unit.kind is UnitKind.KV else None

    def blocked(self, seq: Sequence) -> bool:
        """The next page this sequence would compute is being computed by another one:
        waiting a step for it beats computing it twice."""
        keys = self._keys(seq)
        for i in range(self._reusable(seq)):
            key = keys[i]
            if self._found(key) is None and (self.host is None or key not in self.host):
                holder = self.intents.get(key)
                return holder is not None and holder != seq.id
        return False

    def reuse(self, seq: Sequence) -> int:
        """Pin the pages of seq's known prefix found under their keys (restoring them
        from the host tier if need be); returns the tokens they hold."""
        assert not seq.pages, "reuse runs on a sequence without pages"
        keys = self._keys(seq)
        for key in keys[:self._reusable(seq)]:
            page = self._found(key)
            if page is not None:
                self.pool.pin(page)
            elif self.host is not None and key in self.host:
                page = self.host.restore(self.pool, key, self.layout.page_bytes, self.owner,
                                         self.page_cost)
            if page is None:
                break
            seq.pages.append(page)
        seq.prefix.published = len(seq.pages)
        return len(seq.pages) * self.layout.page_tokens

    def announce(self, seq: Sequence) -> None:
        """Record the keys of the prompt pages seq is about to compute, so that sequences
        arriving with the same prefix wait for them instead of computing them again."""
        state = seq.prefix
        for key in self._keys(seq)[state.published:]:
            if key not in self.intents and self._found(key) is None:
                self.intents[key] = seq.id
                state.intents.append(key)

    def publish(self, seq: Sequence) -> None:
        """Put seq's newly filled pages under their keys."""
        state, p = seq.prefix, self.layout.page_tokens
        full = seq.cached // p
        if state.exact_pages is not None:
            full = min(full, state.exact_pages)
        if full <= state.published:
            return
        keys = self._keys(seq)
        cost = self.page_cost
        for i in range(state.published, full):
            page, key = seq.pages[i], keys[i]
            if self.intents.get(key) == seq.id:
                del self.intents[key]
            if page.key is None and self.pool.lookup(key) is None:
                page.reload_cost = cost
                self.pool.publish(page, key)
        state.published = full

    def inexact(self, seq: Sequence, start: int) -> None:
        """KV from token `start` on was computed inexactly: never publish it."""
        state = seq.prefix
        limit = start // self.layout.page_tokens
        state.exact_pages = limit if state.exact_pages is None else min(state.exact_pages,
                                                                         limit)
        self._withdraw(seq)     # sequences waiting for its pages compute them instead

    def _withdraw(self, seq: Sequence) -> None:
        state = seq.prefix
        for key in state.intents:
            if self.intents.get(key) == seq.id:
                del self.intents[key]
        state.intents.clear()

    def finish(self, seq: Sequence) -> None:
        """seq gives its pages up: published ones stay resident (unpinned), the others
        go back to the pool."""
        state = seq.prefix
        self._withdraw(seq)
        now = time.monotonic()
        kept = 0
        for page in seq.pages:
            if page.key is not None and page.alive:
                self.pool.unpin(page)
                # Earlier pages look more recent, so that orders by last use evict a
                # prefix from its tail (a page is useless once one before it is gone).
                page.last_use = now - kept * 1e-6
                kept += 1
            else:
                self.pool.release(page)
        seq.pages.clear()
        state.published = 0
        state.exact_pages = None

    @property
    def page_cost(self) -> float:
        """Seconds of prefill a full page saves."""
        return self.layout.page_tokens / self.prefill_rate

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Learn this model's prefill speed on this device (a moving average)."""
        if tokens >= 16 and seconds > 0:
            self.prefill_rate = 0.7 * self.prefill_rate + 0.3 * tokens / seconds

