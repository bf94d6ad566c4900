"""The shape of one model's KV pages.

A page holds `page_tokens` tokens of keys and values for every layer of one model:
    page (L, P, 2, KVH, hd)     L = layers, P = tokens per page, 2 = key/value
Keys and values of a token sit together, so gathered pages flatten to a token axis
without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeserve.arch.spec import ModelSpec


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
