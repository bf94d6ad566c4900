"""Task blocks applied to a linear: the torch path against a dense reconstruction, and the
CUDA kernel against the torch path (on a GPU)."""

from __future__ import annotations

import pytest
import torch

from edgeserve.blocks.arena import TileArena
from edgeserve.blocks.delta import TaskDelta, block_delta
from edgeserve.blocks.task import block_index
from edgeserve.pool import BlockPool


def setup(device: str, dtype: torch.dtype, block=(8, 16), shape=(48, 64), n=9, seed=0):
    """A weight, n blocks of new values in an arena, their index, and the dense weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype).to(device)
    pool = BlockPool(device, 1 << 20, 4096)
    arena = TileArena(pool, block, dtype)
    grid = (shape[0] // block[0], shape[1] // block[1])
    picks = torch.randperm(grid[0] * grid[1], generator=gen)[:n].tolist()
    tiles = {f"k{i}": torch.randn(block, generator=gen).to(dtype) for i in range(n)}
    slots, fresh = arena.acquire(list(tiles), "t")
    assert fresh == list(tiles)
    dense = w.clone()
    rows, cols, addr = [], [], []
    for p, (key, tile) in zip(picks, tiles.items(), strict=True):
        arena.view(slots[key]).copy_(tile)
        r, c = divmod(p, grid[1])
        rows.append(r)
        cols.append(c)
        addr.append(arena.address(slots[key]))
        dense[r * block[0]:(r + 1) * block[0], c * block[1]:(c + 1) * block[1]] = tile
    index = block_index(*(torch.tensor(v, device=device) for v in (rows, cols, addr)),
                        block=block, columns=shape[1])
    return w, arena, index, dense


@pytest.mark.parametrize("lead", [(1, 1), (3, 5), (2, 1), (4, 8)])    # both sides of FEW_ROWS
def test_torch_path_equals_the_dense_weight(lead):
    w, arena, index, dense = setup("cpu", torch.float32)
    x = torch.randn(*lead, w.shape[1])
    y = block_delta(x @ w.T, x, w, arena.tiles, index)
    torch.testing.assert_close(y, x @ dense.T, rtol=1e-5, atol=1e-5)


class _Task:
    """What TaskDelta needs of a loaded task: its arena and the index of a unit."""

    def __init__(self, arena: TileArena, index) -> None:
        self.arena, self._index = arena, index

    def index(self, unit: str):
        return self._index

    def vector(self, unit: str):
        return None


def dense_over(w, arena, index):
    """The dense weight an arena's blocks at index make over w."""
    rows, cols, addr = index[:3]
    br, bc = arena.shape
    dense = w.clone()
    for r, c, a in zip(rows.tolist(), cols.tolist(), addr.tolist(), strict=True):
        dense[r * br:(r + 1) * br, c * bc:(c + 1) * bc] = arena.tiles[a]
    return dense


def test_rows_of_different_tasks_get_their_own_blocks():
    w, arena_a, index_a, dense_a = setup("cpu", torch.float32, seed=1)
    _, arena_b, index_b, _ = setup("cpu", torch.float32, seed=2)
    dense_b = dense_over(w, arena_b, index_b)
    x = torch.randn(4, 1, w.shape[1])
    delta = TaskDelta([(torch.tensor([0, 2]), _Task(arena_a, index_a)),
                       (torch.tensor([1]), _Task(arena_b, index_b))])
    y = delta.linear("u", x, x @ w.T, w, None)
    torch.testing.assert_close(y[[0, 2]], x[[0, 2]] @ dense_a.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], x[1] @ dense_b.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[3], x[3] @ w.T, rtol=1e-5, atol=1e-5)     # the base's row


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_cuda_kernel_equals_torch_path(dtype, tokens):
    from edgeserve.kernels.block_delta import _launch

    w, arena, index, _ = setup("cuda", dtype, block=(16, 16), shape=(64, 96), n=12)
    x = torch.randn(tokens, w.shape[1], device="cuda").to(dtype)
    y = x @ w.T
    fast = _launch(y, x, w, arena.pool.slab, arena.step, index[:3], arena.shape)
    slow = block_delta(y, x, w, arena.tiles, index)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert float((fast.float() - slow.float()).abs().max()) <= tol * float(slow.abs().max())
