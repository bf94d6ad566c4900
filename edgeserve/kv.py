"""Paged KV: pages are pool units taken on demand as a sequence grows, returned when it ends.

A page holds `page_tokens` tokens of keys and values for every layer of one model:
    page (L, P, 2, KVH, hd)     L = layers, P = tokens per page, 2 = key/value
Keys and values of a token sit together, so gathered pages flatten to a token axis
without a copy.
Pages are addressed by their first block id, so one strided view of the pool slab
serves every page of the model, and a page table is a list of block ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeserve.arch.spec import ModelSpec
from edgeserve.pool import BlockPool, Unit, UnitKind


@dataclass(frozen=True, slots=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_tokens: int
    page_blocks: int

    @classmethod
    def for_model(cls, spec: ModelSpec, dtype: torch.dtype, block_size: int) -> KVLayout:
        per_token = spec.num_layers * 2 * spec.kv_size * dtype.itemsize
        # Fill a block with as many tokens as fit; a token larger than a block spans several.
        page_tokens = max(1, block_size // per_token)
        page_blocks = -(-page_tokens * per_token // block_size)
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype, page_tokens,
                   page_blocks)

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, self.page_tokens, 2, self.kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        return self.layers * 2 * self.page_tokens * self.kv_heads * self.head_dim * \
            self.dtype.itemsize

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)


class KVCache:
    """The KV pages of one model on one pool."""

    def __init__(self, pool: BlockPool, layout: KVLayout, owner: str) -> None:
        self.pool, self.layout, self.owner = pool, layout, owner
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

    def can_grow(self, pages: list[Unit], tokens: int) -> bool:
        extra = self.layout.pages_for(tokens) - len(pages)
        return extra <= 0 or self.pool.can_allocate(extra * self.layout.page_bytes)

    def grow(self, pages: list[Unit], tokens: int) -> None:
        """Append pages until `tokens` fit; raises PoolFull (keeping what was added)."""
        while len(pages) < self.layout.pages_for(tokens):
            pages.append(self.pool.allocate(UnitKind.KV, self.layout.page_bytes,
                                            owner=self.owner))

    def release(self, pages: list[Unit]) -> None:
        for page in pages:
            self.pool.release(page)
        pages.clear()
