"""Retained KV pages below the device: demoted to the host tier, restored bit-exact.

A retained page that the pool evicts is copied to the host tier first when copying it
back would beat recomputing it (its `reload_cost`, the prefill it saves); a later
sequence whose prefix walks onto it gets it back into a new unit under the same key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from edgeserve.pool import BlockPool, PoolFull, Unit, UnitKind
from edgeserve.tiers import HostTier

log = logging.getLogger("edgeserve.kv")


class KVHostTier:
    """The KV side of the host tier: which entries are pages, and whose."""

    def __init__(self, host: HostTier | None, bandwidth: dict[str, float]) -> None:
        self.host = host
        self.bandwidth = bandwidth          # shared with the eviction policy (measured)
        self.owners: dict[str, tuple[str, int]] = {}    # page key -> (model id, bytes)
        self.demoted = self.restored = 0
        self._dropping = False

    def __contains__(self, key: str) -> bool:
        return self.host is not None and key in self.owners and key in self.host

    def demote(self, pool: BlockPool, unit: Unit) -> None:
        """before_evict hook: keep an evicted page's bytes when that beats recomputing."""
        if (self.host is None or self._dropping or unit.kind is not UnitKind.KV
                or unit.key is None):
            return
        copy_back = unit.nbytes / self.bandwidth["host"]
        if copy_back >= unit.reload_cost or not self.host.put(unit.key, pool.raw(unit)):
            return
        self.owners[unit.key] = (unit.owner or "", unit.nbytes)
        self.demoted += 1

    def restore(self, pool: BlockPool, key: str, nbytes: int, owner: str,
                cost: float) -> Unit | None:
        """A pinned page with the host copy's bytes under `key` (cost: the prefill it
        saves); None if it cannot be."""
        data = self.host.get(key) if self.host is not None else None
        if data is None or data.numel() != nbytes:
            return None
        try:
            unit = pool.allocate(UnitKind.KV, nbytes, owner=owner)
        except PoolFull:
            return None
        pool.raw(unit).copy_(data)
        pool.publish(unit, key)
        unit.reload_cost = cost
        self.restored += 1
        return unit

    def bytes_by_model(self) -> dict[str, int]:
        """Host-tier bytes of KV pages per model (entries the tier dropped forgotten)."""
        out: dict[str, int] = {}
        for key, (owner, nbytes) in list(self.owners.items()):
            if self.host is None or key not in self.host:
                self.owners.pop(key, None)
                continue
            out[owner] = out.get(owner, 0) + nbytes
        return out

    def clear(self, pools: Iterable[BlockPool]) -> int:
        """Drop every retained page, on the devices and in the host tier; returns how many
        pages went from the devices."""
        dropped = 0
        self._dropping = True
        try:
            for pool in pools:
                for unit in [u for u in list(pool.units.values())
                             if u.kind is UnitKind.KV and u.pins == 0]:
                    pool.evict_unit(unit)
                    dropped += 1
        finally:
            self._dropping = False
        if self.host is not None:
            for key in self.owners:
                self.host.drop(key)
        self.owners.clear()
        return dropped
