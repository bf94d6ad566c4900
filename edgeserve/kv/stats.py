"""KV bytes per model: held by running sequences, retained for reuse, in the host tier."""

from __future__ import annotations

from typing import Any

from edgeserve.pool import BlockPool, UnitKind


def kv_bytes(pool: BlockPool) -> dict[str, dict[str, int]]:
    """owner model -> {"running_bytes", "retained_bytes"} of its KV pages on this pool
    (whole blocks; a page in use by any sequence counts as running)."""
    out: dict[str, dict[str, int]] = {}
    for unit in pool.units_of(UnitKind.KV):
        entry = out.setdefault(unit.owner or "", {"running_bytes": 0, "retained_bytes": 0})
        entry["running_bytes" if unit.pins else "retained_bytes"] += \
            unit.nblocks * pool.block_size
    return out


def prefix_stats(enabled: bool, host: Any) -> dict[str, Any]:
    """The prefix cache's settings and host-tier figures (host: a KVHostTier or None)."""
    return {"enabled": enabled,
            "host_bytes_by_model": host.bytes_by_model() if host is not None else {},
            "demoted_pages": host.demoted if host is not None else 0,
            "restored_pages": host.restored if host is not None else 0}
