"""Expert copies into the pool that run beside the computation.

On CUDA an expert's bytes go from page-locked host memory (tiers.HostSlab) to its pool
units on a copy stream of their own, and an event marks each copy's end. The computation
waits for that event only when it reaches the expert: the experts already resident are
computed while the copy is in flight (the miss of this layer, or the prefetch of a coming
one). Elsewhere a copy is a plain copy, done when it is started.

Rules that keep the bytes right:
- a copy starts after everything the computation has queued so far (the units it writes
  may have held an expert that work still queued reads);
- `ready(key)` before computing with an expert;
- `settle(key)` before an expert's units are released (a copy may still be writing);
- `drain()` at the end of every forward, finished or failed, so that whatever runs after it
  on the device (other models, pool compaction, other threads) comes after every copy.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


class CopyQueue:
    """Copies that the device may run beside the computation; a plain copy on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: dict[Hashable, torch.cuda.Event] = {}
        self.started = 0                      # copies started beside the computation

    @property
    def overlaps(self) -> bool:
        return self.stream is not None

    def start(self, key: Hashable, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each (destination, source) pair: key's weights are in place once
        `ready(key)` has returned."""
        if self.stream is None:
            for dst, src in pairs:
                dst.copy_(src)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[key] = done
        self.started += 1

    def is_pending(self, key: Hashable) -> bool:
        return key in self.pending

    def ready(self, key: Hashable) -> None:
        """Make the computation queued from now on wait for key's copy."""
        done = self.pending.pop(key, None)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def settle(self, key: Hashable) -> None:
        """Wait, on the host, until key's copy has finished (its units are to be freed)."""
        done = self.pending.pop(key, None)
        if done is not None:
            done.synchronize()

    def drain(self) -> None:
        """Order everything queued from now on after every copy started so far."""
        for key in list(self.pending):
            self.ready(key)
