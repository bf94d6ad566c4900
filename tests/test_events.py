from __future__ import annotations

from edgeserve.events import EventLog, log_of, publish
from edgeserve.pool import BlockPool, UnitKind


def pool(device: str = "cpu") -> BlockPool:
    return BlockPool(device, 16 * 64, 64, storage=False)


def test_publish_without_a_log_does_nothing() -> None:
    p = pool()
    publish(p, "load", "m", seconds=1.0)
    assert log_of(p) is None


def test_events_are_numbered_and_read_since() -> None:
    p, log = pool(), EventLog()
    log.attach([p])
    publish(p, "load", "a", bytes_total=10, device="ignored")
    publish(p, "unload", model="a", retained=True)
    events = log.since(0)
    assert [(e.seq, e.kind, e.model, e.device) for e in events] == \
        [(1, "load", "a", "cpu"), (2, "unload", "a", "cpu")]
    assert events[0].to_json()["bytes_total"] == 10 and events[0].to_json()["device"] == "cpu"
    assert log.since(1) == events[1:] and log.since(2) == []
    assert log.since(0, limit=1) == events[1:]


def test_the_log_is_bounded() -> None:
    log = EventLog(capacity=3)
    for i in range(5):
        log.add("x", "cpu", None, i=i)
    assert [e.data["i"] for e in log.since(0)] == [2, 3, 4] and log.last_seq == 5


def test_evictions_are_recorded_per_device_until_detached() -> None:
    a, b, log = pool("cpu:0"), pool("cpu:1"), EventLog()
    log.attach([a, b])
    log.attach([a])                     # attaching twice records once
    unit = a.allocate(UnitKind.WEIGHT, 200, key="k", owner="m", pin=False)
    a.evict()
    other = b.allocate(UnitKind.KV, 64, owner="n", pin=False)
    b.evict_unit(other)
    got = [(e.kind, e.device, e.model, e.data["unit"], e.data["unit_kind"], e.data["bytes"])
           for e in log.since(0)]
    assert got == [("evict", "cpu:0", "m", unit.id, "weight", 200),
                   ("evict", "cpu:1", "n", other.id, "kv", 64)]
    log.detach([a, b])
    a.allocate(UnitKind.WEIGHT, 64, pin=False)
    a.evict()
    publish(a, "load", "m")
    assert len(log.since(0)) == 2 and a.on_evict == [] and log_of(a) is None


def test_a_pool_has_one_log_at_a_time() -> None:
    p, first, second = pool(), EventLog(), EventLog()
    first.attach([p])
    second.attach([p])
    p.allocate(UnitKind.WEIGHT, 64, pin=False)
    p.evict()
    publish(p, "load", "m")
    assert first.since(0) == [] and [e.kind for e in second.since(0)] == ["evict", "load"]
    assert len(p.on_evict) == 1
