"""StepBatch: everything one forward pass needs, built from the sequences taking part.

Queries are laid out padded, (B, S): B sequences, S = the most new tokens of any of them
(1 in a decode step). Keys and values come from the pages (gathered) unless every
sequence starts at position 0 (a fresh prefill), where the new keys are used directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from edgeserve.pool import Unit

if TYPE_CHECKING:
    from edgeserve.quant.linear import QWeight


class Delta(Protocol):
    def linear(self, unit: str, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | QWeight,
               b: torch.Tensor | None) -> torch.Tensor: ...

    def norm(self, unit: str, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor: ...

    def embed(self, unit: str, tokens: torch.Tensor, x: torch.Tensor,
              vocab: int) -> torch.Tensor: ...


@dataclass(slots=True)
class StepBatch:
    tokens: torch.Tensor       # (B, S) int64, padded with 0
    positions: torch.Tensor    # (B, S) int64
    valid: torch.Tensor        # (B, S) bool: a real token, not padding
    kv_lens: torch.Tensor      # (B,) tokens in the cache after this step
    page_table: torch.Tensor   # (B, max pages) page addresses (block ids)
    slot_page: torch.Tensor    # (N,) page address of each valid new token, row-major
    slot_offset: torch.Tensor  # (N,) its offset inside the page
    last: torch.Tensor         # (B,) index in S of each sequence's last new token
    fresh: bool                # every sequence starts at 0: attend to the new keys only
    padded: bool               # some rows are shorter than S
    width: int                 # S
    max_kv: int                # the most tokens any sequence has in the cache after this step
    uniform: bool              # every sequence has max_kv tokens
    # Per-row task changes, applied by the model after each linear, norm and embedding
    # lookup (blocks/delta.py); None: no row belongs to a task.
    delta: Delta | None = None


    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


def build_batch(chunks: Sequence[tuple[Sequence[int], int, Sequence[Unit]]],
                page_tokens: int, device: torch.device) -> StepBatch:
    """chunks: (new token ids, position of the first, pages holding the sequence)."""
    width = max(len(ids) for ids, _, _ in chunks)
    max_pages = max(len(pages) for _, _, pages in chunks)
    tokens, positions, valid, page_table = [], [], [], []
    slot_page, slot_offset, kv_lens, last = [], [], [], []
    for ids, start, pages in chunks:
        n = len(ids)
        pad = width - n
        tokens.append([*ids, *([0] * pad)])
        # Padding rows repeat the last position so that their (ignored) attention is defined.
        positions.append([*range(start, start + n), *([start + n - 1] * pad)])
        valid.append([True] * n + [False] * pad)
        addresses = [p.start for p in pages]
        page_table.append(addresses + [addresses[0]] * (max_pages - len(addresses)))
        for pos in range(start, start + n):
            slot_page.append(addresses[pos // page_tokens])
            slot_offset.append(pos % page_tokens)
        kv_lens.append(start + n)
        last.append(n - 1)

    def t(x: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device=device)

    return StepBatch(t(tokens), t(positions), t(valid, torch.bool), t(kv_lens), t(page_table),
                     t(slot_page), t(slot_offset), t(last),
                     fresh=all(start == 0 for _, start, _ in chunks),
                     padded=any(len(ids) < width for ids, _, _ in chunks), width=width,
                     max_kv=max(kv_lens), uniform=min(kv_lens) == max(kv_lens))
