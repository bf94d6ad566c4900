"""Block storage and free-run bookkeeping over block ids (no knowledge of units)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from edgeserve.pool.hugepages import host_buffer


def allocate_slab(device: str, nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes: CuPy memory on CUDA, host memory on the CPU (on huge pages
    where the kernel offers them)."""
    if device.startswith("cuda"):
        import cupy

        index = int(device.split(":")[1]) if ":" in device else 0
        with cupy.cuda.Device(index):
            mem = cupy.empty(nbytes, dtype=cupy.uint8)
        # torch shares the CuPy allocation (no copy); DLPack keeps it alive with the tensor.
        return torch.from_dlpack(mem)
    return host_buffer(nbytes)


@dataclass
class Blocks:
    """Free-run bookkeeping over block ids (no storage)."""

    count: int
    owner: list[int] = field(init=False)               # unit id per block, -1 when free
    free_runs: list[tuple[int, int]] = field(init=False)  # (start, length), sorted, merged
    free: int = field(init=False)

    def __post_init__(self) -> None:
        self.owner = [-1] * self.count
        self.free_runs = [(0, self.count)] if self.count else []
        self.free = self.count

    def find_run(self, n: int) -> int | None:
        for start, length in self.free_runs:
            if length >= n:
                return start
        return None

    def take(self, start: int, n: int, unit_id: int) -> None:
        i = bisect.bisect_right(self.free_runs, (start, self.count + 1)) - 1
        run_start, run_len = self.free_runs[i]
        assert run_start <= start and start + n <= run_start + run_len, "blocks not free"
        pieces = [(run_start, start - run_start), (start + n, run_start + run_len - start - n)]
        self.free_runs[i:i + 1] = [p for p in pieces if p[1] > 0]
        self.owner[start:start + n] = [unit_id] * n
        self.free -= n

    def give(self, start: int, n: int) -> None:
        self.owner[start:start + n] = [-1] * n
        self.free += n
        i = bisect.bisect_left(self.free_runs, (start, 0))
        if i > 0 and sum(self.free_runs[i - 1]) == start:       # merge with the run before
            i -= 1
            start, n = self.free_runs[i][0], self.free_runs[i][1] + n
            del self.free_runs[i]
        if i < len(self.free_runs) and self.free_runs[i][0] == start + n:  # and the one after
            n += self.free_runs[i][1]
            del self.free_runs[i]
        self.free_runs.insert(i, (start, n))
