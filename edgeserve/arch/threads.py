"""Intra-op threads during a small forward on the CPU: one for the small ops, all for matmuls.

A decode step runs a few hundred small ops (norms, rotary embeddings, KV writes and
gathers, attention over a few hundred keys) between its matmuls. Spread over threads,
each costs a fork and a join, more than the op itself; on a busy machine a join waits
for a thread that lost its core. So within `small_ops()` torch runs on one thread, and
`linear()` widens to every thread around each matmul (`wide()` tells it how many), where
the work is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_FORWARD_TOKENS = 64       # forwards of at most this many new tokens count as small

_local = threading.local()


@contextmanager
def small_ops(tokens: int, device: torch.device) -> Iterator[None]:
    """Run a forward of `tokens` new tokens with its small ops on one thread, when it is
    small, on the CPU, and torch has several threads; otherwise change nothing."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or tokens > SMALL_FORWARD_TOKENS or wide():
        yield
        return
    _local.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _local.threads = 0
        torch.set_num_threads(threads)


def wide() -> int:
    """Threads a matmul should widen to inside `small_ops()` (then narrow back to one);
    0 outside it."""
    threads: int = getattr(_local, "threads", 0)
    return threads
