"""What a block pool holds: bytes by unit kind (now and at their peak) and by owner."""

from __future__ import annotations

import threading

from edgeserve.pool.units import Unit, UnitKind


class Usage:
    """BlockPool's byte counts, kept under the pool's lock as units come and go."""

    block_size: int
    units: dict[int, Unit]
    _lock: threading.RLock

    def __init__(self) -> None:
        self._bytes_by_kind = dict.fromkeys(UnitKind, 0)
        self._peak_by_kind = dict.fromkeys(UnitKind, 0)

    def _account(self, unit: Unit, sign: int) -> None:
        kind = unit.kind
        self._bytes_by_kind[kind] += sign * unit.nblocks * self.block_size
        self._peak_by_kind[kind] = max(self._peak_by_kind[kind], self._bytes_by_kind[kind])

    def bytes_by_kind(self) -> dict[str, int]:
        with self._lock:
            return {k.value: v for k, v in self._bytes_by_kind.items()}

    def peak_by_kind(self) -> dict[str, int]:
        with self._lock:
            return {k.value: v for k, v in self._peak_by_kind.items()}

    def bytes_by_owner(self) -> dict[str, dict[str, int]]:
        """owner -> kind -> bytes (whole blocks); units without an owner are left out."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for unit in self.units.values():
                if unit.owner is not None:
                    kinds = out.setdefault(unit.owner, {})
                    kinds[unit.kind.value] = (kinds.get(unit.kind.value, 0)
                                              + unit.nblocks * self.block_size)
        return out

    def reset_peak(self) -> None:
        with self._lock:
            self._peak_by_kind = dict(self._bytes_by_kind)
