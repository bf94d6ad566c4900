from __future__ import annotations

import random

from edgeserve.pool import BlockPool, Unit, UnitKind
from edgeserve.poolmap import apply, diff, snapshot


def models(unit: Unit) -> tuple[str, ...]:
    return (unit.owner,) if unit.owner else ()


def test_snapshot_rows() -> None:
    pool = BlockPool("cpu", 8 * 64, 64, storage=False)
    w = pool.allocate(UnitKind.WEIGHT, 130, key="w", owner="m")
    kv = pool.allocate(UnitKind.KV, 64, owner="m", pin=False)
    snap = snapshot(pool, models)
    assert snap.units == {w.id: (0, 3, "weight", 1, ("m",)), kv.id: (3, 1, "kv", 0, ("m",))}
    assert snap.used_blocks == 4
    assert snap.to_json() == {"device": "cpu", "num_blocks": 8, "block_size": 64,
                              "units": [[w.id, 0, 3, "weight", 1, ["m"]],
                                        [kv.id, 3, 1, "kv", 0, ["m"]]]}
    assert diff(snap, snapshot(pool, models)) is None      # nothing changed: nothing to send


def test_diff_names_only_what_changed() -> None:
    pool = BlockPool("cpu", 8 * 64, 64, storage=False)
    a = pool.allocate(UnitKind.WEIGHT, 64, key="a", owner="m")
    b = pool.allocate(UnitKind.WEIGHT, 64, key="b", owner="m")
    before = snapshot(pool, models)
    pool.unpin(a)
    pool.release(b)
    c = pool.allocate(UnitKind.KV, 128, owner="n")
    change = diff(before, snapshot(pool, models))
    assert change == {"device": "cpu", "drop": [b.id],
                      "set": [[a.id, 0, 1, "weight", 0, ["m"]], [c.id, 1, 2, "kv", 1, ["n"]]]}


def test_applying_diffs_follows_the_pool() -> None:
    rng = random.Random(7)
    pool = BlockPool("cpu", 64 * 64, 64, storage=False)
    seen = snapshot(pool, models)
    page = seen.to_json()
    for step in range(300):
        roll = rng.random()
        live = list(pool.units.values())
        if roll < 0.5 and pool.free_bytes >= 64:
            pool.allocate(rng.choice(list(UnitKind)), rng.randint(1, 4 * 64),
                          owner=rng.choice(["a", "b"]), pin=rng.random() < 0.5, evict=False) \
                if pool.can_allocate(4 * 64, evict=False) else None
        elif roll < 0.7 and live:
            pool.release(rng.choice(live))
        elif roll < 0.85 and live:
            unit = rng.choice(live)
            pool.pin(unit) if unit.pins == 0 else pool.unpin(unit)
        elif roll < 0.95:
            pool.compact()
        else:
            pool.evict()
        now = snapshot(pool, models)
        change = diff(seen, now)
        if change is not None:
            page = apply(page, change)
        assert sorted(page["units"]) == sorted(now.to_json()["units"]), step
        seen = now
