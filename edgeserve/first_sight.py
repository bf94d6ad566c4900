"""Keys for a load of files never seen before, hashed by the reader threads as they read.

A load normally knows every unit's content key before it reads (tensor hashes are cached
per file), so the units already resident are pinned rather than read. The first time a
file is seen its hashes are unknown. Instead of reading it twice (a hashing pass, then the
load), the load allocates every unit without a key and the reader threads hash each
tensor as its bytes stream into the pool. Once read, the keys are computed exactly as
from cached hashes; a unit whose key turns out to be resident already is released right
after, and the model uses the resident one.

Reading a file whole into the pool is the wrong choice where the model shares most of its
units with resident ones (a fine-tune of a resident base): it would allocate room for
bytes already held, and may evict them to make it. Such a file is hashed whole before the
load instead, so that the load pins what it finds. Which of the two a file gets is
decided by two units (`worth_a_pass`): models of one architecture have units of equal sizes
whatever their lineage, but only a relative has equal bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeserve.arch.spec import ModelSpec
from edgeserve.checkpoint import HashCache, StreamHashes
from edgeserve.loader import LoadContext, LoadReport, Prepared, Sources, unit_keys
from edgeserve.pool import BlockPool, Unit
from edgeserve.tiers import ReadOptions


@dataclass
class FirstSight:
    """What a load of never-hashed files collects while it reads."""

    hashes: StreamHashes = field(default_factory=StreamHashes)
    stamps: dict[Path, list[int]] = field(default_factory=dict)   # taken before the read

    @classmethod
    def of(cls, sources: Sources, cache: HashCache) -> FirstSight | None:
        """None when the keys are known already (cached hashes). The tensors a probe hashed
        (`worth_a_pass`) are not hashed again."""
        if sources.known:
            return None
        paths = {t.path for t in sources.tensors.values()}
        first = cls(stamps={p: HashCache.stamp(p) for p in paths})
        for path, stamp in first.stamps.items():
            first.hashes.know(path, cache.partial(path, first.hashes.algorithm, stamp))
        return first

    def options(self, stop: threading.Event | None = None) -> ReadOptions:
        return ReadOptions(self.hashes, stop)

    def keys(self, model_dir: Path, spec: ModelSpec, ctx: LoadContext, owner: str,
             sources: Sources) -> dict[str, str]:
        """(any thread, after the read) Cache every file's hashes; the unit keys."""
        known = {}
        for path, stamp in self.stamps.items():
            known[path] = self.hashes.complete(path)
            ctx.hashes.put(path, known[path], self.hashes.algorithm, stamp)
            ctx.hashes.computed += 1
            ctx.hashes.streamed += 1
        return unit_keys(model_dir, spec, ctx, owner, sources.tensors, known=known)


def worth_a_pass(model_dir: Path, spec: ModelSpec, ctx: LoadContext, owner: str,
                 sources: Sources, nbytes: dict[str, int], sizes: set[int],
                 held: Callable[[str], bool]) -> bool:
    """(any thread) Whether a never-hashed model may share units with those held (`held`:
    resident, in the host tier or coming), so that hashing its files whole before its load
    pays: two of its units of a held unit's size (`sizes`; `nbytes` per unit), the largest
    and one half way through the model, are keyed from their own tensors alone and looked
    up. A fine-tune keeps its base's embedding and most of its layers (two, so that a base
    partly evicted, or a fine-tune that changed one of them, is still found); a model of
    another lineage shares none of them and is read once, hashed as it streams in."""
    fitting = [name for name in nbytes if nbytes[name] in sizes]
    if not fitting:
        return False
    probes = {max(fitting, key=nbytes.__getitem__), fitting[len(fitting) // 2]}
    keys = unit_keys(model_dir, spec, ctx, owner, sources.tensors, only=probes)
    return any(held(keys[name]) for name in probes if name in keys)


def settle(prepared: Prepared, keys: dict[str, str], pool: BlockPool,
           report: LoadReport) -> int:
    """(engine thread) Key the units this load read; release each whose bytes turned out
    to be resident already, using the resident unit instead. Returns the bytes released."""
    fresh = {u.id for u in prepared.fresh}
    chosen: dict[int, Unit] = {}
    released = 0
    for name, unit in list(prepared.units.items()):
        if unit.id not in fresh or unit.key is not None:
            continue
        if unit.id in chosen:
            prepared.units[name] = chosen[unit.id]
            continue
        same = pool.lookup(keys[name])
        if same is None:
            pool.publish(unit, keys[name])
            chosen[unit.id] = unit
            continue
        pool.pin(same)
        pool.release(unit)
        released += unit.nbytes
        chosen[unit.id] = prepared.units[name] = same
    prepared.fresh = [u for u in prepared.fresh if u.alive]
    report.bytes_released += released
    report.bytes_from_disk -= released
    report.bytes_from_device += released
    report.bytes_total = sum(u.nbytes for u in {u.id: u for u in prepared.units.values()}
                             .values()) + (prepared.host.nbytes if prepared.host else 0)
    return released
