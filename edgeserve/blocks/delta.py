"""Task changes applied in a forward: y = x W^T for the whole batch, then per task

    y[rows, block row r] += x[rows, block col c] @ (V - W[r, c])^T   for each of its blocks,

where V is the task's block (zeros for a pruned one) and W[r, c] the base's; a changed bias
adds its difference to its rows, a changed norm weight normalises its rows anew, and the
embeddings of its rows are read from its blocks of the embedding matrix where it has them.
No dense copy of a task's weight is ever made: the base is read once for the batch, each
task's blocks add their difference to its own rows. Sequences of different tasks of one
base thus share one forward (see bench/tasks.py for batched against interleaved).

Legend: N = tokens of the rows, n = blocks, br x bc = block, R x C = weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from edgeserve.arch.dense import rms_norm
from edgeserve.blocks.task import Index, TaskBlocks
from edgeserve.kernels.block_delta import block_delta_cuda
from edgeserve.quant.linear import QWeight

FEW_ROWS = 8        # up to this many rows (decode): x @ V^T - x @ W^T, not x @ (V - W)^T


def block_delta(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor | QWeight,
                tiles: torch.Tensor, index: Index) -> torch.Tensor:
    """The torch path: y (.., R) plus the blocks' differences applied to x (.., C)."""
    rows_idx, cols_idx, addr, w_rows = index
    br, bc = int(tiles.shape[1]), int(tiles.shape[2])
    r, c = w.shape
    new = tiles.index_select(0, addr).to(x.dtype)                               # (n, br, bc)
    # A quantized base: its values dequantized, only the blocks' (blocks replace them).
    old = (w.chunks(w_rows, bc, x.dtype) if isinstance(w, QWeight) else
           F.embedding(w_rows, w.view(-1, bc)).to(x.dtype)).view(-1, br, bc)
    lead = x.shape[:-1]
    xb = x.reshape(-1, c // bc, bc).index_select(1, cols_idx).transpose(0, 1)   # (n, N, bc)
    if x.dtype == torch.float32 and xb.shape[1] <= FEW_ROWS:
        # Few rows: two products cost less than forming V - W (in fp32 their difference
        # keeps the change's precision; in 16-bit types it would not).
        out = torch.baddbmm(torch.bmm(xb, new.transpose(1, 2)), xb, old.transpose(1, 2),
                            alpha=-1)                                           # (n, N, br)
    else:
        out = torch.bmm(xb, (new - old).transpose(1, 2))
    corr = torch.zeros(xb.shape[1], r // br, br, dtype=y.dtype, device=y.device)
    corr.index_add_(1, rows_idx, out.transpose(0, 1).to(y.dtype))
    return y + corr.view(*lead, r)


def embed_blocks(x: torch.Tensor, tokens: torch.Tensor, table: torch.Tensor,
                 tiles: torch.Tensor) -> torch.Tensor:
    """x (.., C) = embeddings of tokens (..,), with the rows that fall in the task's blocks
    of the embedding matrix taken from those blocks. table (R/br, C/bc): each block's
    address in tiles, -1 where the task keeps the base's."""
    br, bc = int(tiles.shape[1]), int(tiles.shape[2])
    tok = tokens.reshape(-1)
    where = table[tok // br]                                            # (N, C/bc)
    n, c = (where >= 0).nonzero(as_tuple=True)
    if n.numel() == 0:
        return x
    out = x.reshape(-1, table.shape[1], bc).clone()
    out[n, c] = tiles[where[n, c], tok[n] % br].to(x.dtype)
    return out.view(x.shape)


class TaskDelta:
    """The per-row task changes of one batch, called by the model at each linear, norm and
    embedding lookup (see batch.StepBatch.delta)."""

    def __init__(self, groups: Sequence[tuple[torch.Tensor | None, TaskBlocks]]) -> None:
        self.groups = groups        # (batch rows, or None for every row; the task's blocks)

    def linear(self, unit: str, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | QWeight,
               b: torch.Tensor | None) -> torch.Tensor:
        bias = unit.removesuffix("weight") + "bias"
        for rows, task in self.groups:
            index = task.index(unit)
            new_bias = task.vector(bias) if b is not None else None
            if index is not None or new_bias is not None:
                y = _on_rows(y, rows, _linear, (y, x), w, b, task, index, new_bias)
        return y

    def norm(self, unit: str, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        for rows, task in self.groups:
            weight = task.vector(unit)
            if weight is not None:
                y = _on_rows(y, rows, rms_norm, (x,), weight, eps)
        return y

    def embed(self, unit: str, tokens: torch.Tensor, x: torch.Tensor,
              vocab: int) -> torch.Tensor:
        for rows, task in self.groups:
            if task.index(unit) is not None:
                table = task.embed_table(unit, vocab, x.shape[-1])
                x = _on_rows(x, rows, embed_blocks, (x, tokens), table, task.arena.tiles)
        return x


def _on_rows(out: torch.Tensor, rows: torch.Tensor | None, f: Callable[..., torch.Tensor],
             per_row: tuple[torch.Tensor, ...], *rest: Any) -> torch.Tensor:
    """out with a group's rows replaced by f over those rows of per_row (every row: rows
    None), the rest of f's arguments as given."""
    if rows is None:
        return f(*per_row, *rest)
    return out.index_copy(0, rows, f(*(t[rows] for t in per_row), *rest))


def _linear(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor | QWeight,
            b: torch.Tensor | None,
            task: TaskBlocks, index: Index | None, new_bias: torch.Tensor | None
            ) -> torch.Tensor:
    """One task's rows of a linear: its blocks, then its bias's difference."""
    if index is not None:
        y = _apply(y, x, w, task, index)
    if new_bias is not None and b is not None:
        y = y + (new_bias - b).to(y.dtype)
    return y


def _apply(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor | QWeight, task: TaskBlocks,
           index: Index) -> torch.Tensor:
    arena = task.arena
    if y.is_cuda and arena.pool.slab is not None and isinstance(w, torch.Tensor):
        return block_delta_cuda(y, x, w, arena.pool.slab, arena.step, index[:3], arena.shape,
                                lambda: block_delta(y, x, w, arena.tiles, index))
    return block_delta(y, x, w, arena.tiles, index)


def task_delta(tasks: Sequence[TaskBlocks | None]) -> TaskDelta | None:
    """The delta for a batch whose row i belongs to tasks[i] (None: the base itself)."""
    present = {id(t): t for t in tasks if t is not None}
    if not present:
        return None
    if len(present) == 1 and all(t is not None for t in tasks):
        return TaskDelta([(None, next(iter(present.values())))])
    device = torch.device(next(iter(present.values())).arena.pool.device)
    groups = []
    for key, task in present.items():
        rows = [i for i, t in enumerate(tasks) if t is not None and id(t) == key]
        groups.append((torch.tensor(rows, dtype=torch.int64, device=device), task))
    return TaskDelta(groups)
