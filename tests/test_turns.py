"""Load turns per device: loads onto different devices go side by side, loads onto one
device take turns, and a load is placed before it waits (simulated devices: CPU pools)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from edgeserve import EdgeServer
from edgeserve.grouping import Grouping


@pytest.fixture
def store(family_store):
    return family_store


def server(store) -> EdgeServer:
    return EdgeServer(models=store, device="cpu:0,cpu:1", pool_size="2MiB,2MiB",
                      block_size="4KiB", host_size="64MiB", prewarm=False)


class HeldReads:
    """The first disk read of the server blocks until released: a slow disk under a load."""

    def __init__(self, es: EdgeServer) -> None:
        self.disk = es.scheduler.disk
        self.inner = self.disk.load
        self.entered, self.release = threading.Event(), threading.Event()
        self.first = True

    def __enter__(self) -> HeldReads:
        self.disk.load = self.load      # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.disk.load = self.inner     # type: ignore[method-assign]

    def load(self, *args: object, **kwargs: object) -> None:
        if self.first:
            self.first = False
            self.entered.set()
            assert self.release.wait(30)
        self.inner(*args, **kwargs)  # type: ignore[arg-type]

    async def held(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)


async def test_a_load_on_another_device_completes_while_one_is_held(store):
    async with server(store) as es:
        with HeldReads(es) as reads:
            big = asyncio.create_task(es.load("llama", device="cpu:0"))
            await reads.held()
            start = time.monotonic()
            report = await asyncio.wait_for(es.load("qwen2", device="cpu:1"), 20)
            assert report.device == "cpu:1" and not big.done()
            out = await asyncio.wait_for(es.complete("qwen2", [1, 2, 3], max_tokens=3), 20)
            assert len(out.token_ids) > 0 and not big.done()   # the step thread runs too
            assert time.monotonic() - start < 20
            es.pools["cpu:1"].check_integrity()
            reads.release.set()
            assert (await big).device == "cpu:0"
        assert set(es.scheduler.models) == {"llama", "qwen2"}
        for pool in es.pools.values():
            pool.check_integrity()


async def test_loads_onto_one_device_take_turns(store):
    async with server(store) as es:
        with HeldReads(es) as reads:
            big = asyncio.create_task(es.load("llama", device="cpu:0"))
            await reads.held()
            second = asyncio.create_task(es.load("mistral", device="cpu:0"))
            await asyncio.sleep(0.3)
            assert not second.done() and not big.done()       # it waits for cpu:0's turn
            queued = es.scheduler.grouping.queue
            assert [(q.model, q.device) for q in queued] == [("mistral", "cpu:0")]
            reads.release.set()
            await big
            report = await second
        assert report.device == "cpu:0" and report.turn_seconds >= 0.25
        for pool in es.pools.values():
            pool.check_integrity()


async def test_a_fine_tune_goes_where_its_base_is_being_loaded(store):
    async with server(store) as es:          # the store's hashes, cached
        await es.load("llama")
        await es.load("llama-ft")
    async with server(store) as es:
        with HeldReads(es) as reads:
            base = asyncio.create_task(es.load("llama", device="cpu:1"))
            await reads.held()
            ft = asyncio.create_task(es.load("llama-ft"))
            await asyncio.sleep(0.3)
            assert not ft.done()                  # it waits behind its base, on cpu:1
            assert es.scheduler.placer.incoming["llama"][0] == "cpu:1"     # in its turn
            queued = es.scheduler.grouping.queue
            assert [(q.model, q.device) for q in queued] == [("llama-ft", "cpu:1")]
            reads.release.set()
            await base
            report = await ft
        assert report.device == "cpu:1"
        assert report.bytes_from_device > 0.8 * report.bytes_total   # the base's units
        assert not es.scheduler.placer.incoming
        for pool in es.pools.values():
            pool.check_integrity()


async def test_turns_per_device_are_chosen_per_device():
    g = Grouping(bound=10.0)
    order: list[str] = []
    gate = asyncio.Event()

    async def load(model: str, device: str, hold: bool = False) -> None:
        async with g.turn(model, device=device):
            order.append(model)
            if hold:
                await gate.wait()

    held = asyncio.create_task(load("big", "cpu:0", hold=True))
    await asyncio.sleep(0.02)
    assert g.locked() and order == ["big"]
    same = asyncio.create_task(load("next", "cpu:0"))
    other = asyncio.create_task(load("small", "cpu:1"))
    await asyncio.wait_for(other, 1)              # cpu:1 is free: it goes at once
    await asyncio.sleep(0.02)
    assert order == ["big", "small"] and not same.done()
    changes = g.changes
    gate.set()
    await asyncio.gather(held, same)
    assert order == ["big", "small", "next"] and g.changes == changes + 2
    assert not g.locked()


async def test_a_load_is_placed_again_when_its_turn_comes_on_changed_pools(store):
    async with server(store) as es:
        placer = es.scheduler.placer
        choose, calls = placer.choose, []

        async def first_on_cpu0(model_id, needs, device):     # an outdated first choice
            calls.append(model_id)
            first = model_id == "mistral" and calls.count(model_id) == 1
            return await choose(model_id, needs, "cpu:0" if first else device)

        placer.choose = first_on_cpu0        # type: ignore[method-assign]
        with HeldReads(es) as reads:
            big = asyncio.create_task(es.load("llama", device="cpu:0"))
            await reads.held()
            moved = asyncio.create_task(es.load("mistral"))
            await asyncio.sleep(0.3)
            queued = es.scheduler.grouping.queue
            assert [(q.model, q.device) for q in queued] == [("mistral", "cpu:0")]
            assert "mistral" not in placer.incoming and not moved.done()
            reads.release.set()
            await big
            report = await moved
        assert calls.count("mistral") == 2          # placed again once llama's turn ended
        assert report.device == "cpu:1" and not report.placement["override"]
        for pool in es.pools.values():
            pool.check_integrity()


async def test_a_fine_tune_of_a_resident_base_loads_beside_a_held_load(store):
    """It lacks a tenth of its bytes and pins its base's units: it copies beside the load
    holding cpu:0's turn instead of waiting for it, and computes as its own weights say."""
    from hf_models import hf_greedy

    async with server(store) as es:          # the store's hashes, cached
        await es.load("llama-ft")
    async with server(store) as es:
        await es.load("llama", device="cpu:0")
        with HeldReads(es) as reads:
            other = asyncio.create_task(es.load("qwen2", device="cpu:0"))
            await reads.held()
            report = await asyncio.wait_for(es.load("llama-ft", device="cpu:0"), 10)
            assert not other.done() and report.device == "cpu:0" and report.beside
            assert report.bytes_from_device > 0.8 * report.bytes_total
            out = await asyncio.wait_for(es.complete("llama-ft", [1, 2, 3], max_tokens=6,
                                                     temperature=0, ignore_eos=True), 10)
            reads.release.set()
            await other
        assert out.token_ids == hf_greedy(store / "llama-ft", [1, 2, 3], 6)
        assert not es.scheduler.placer.bringing and not es.scheduler.grouping.sharing["cpu:0"]
        for pool in es.pools.values():
            pool.check_integrity()


async def test_a_fine_tune_of_a_retained_base_loads_beside_a_load_not_needing_it(store):
    """Its base's units are retained, pinned by no model, and the load holding the turn
    needs none of them: it copies beside that load."""
    async with server(store) as es:
        await es.load("llama-ft")
    async with server(store) as es:
        await es.load("llama", device="cpu:0")
        await es.unload("llama")
        with HeldReads(es) as reads:
            other = asyncio.create_task(es.load("qwen2", device="cpu:0"))
            await reads.held()
            report = await asyncio.wait_for(es.load("llama-ft", device="cpu:0"), 10)
            assert not other.done() and report.bytes_from_device > 0.8 * report.bytes_total
            assert report.beside
            reads.release.set()
            assert not (await other).beside
        for pool in es.pools.values():
            pool.check_integrity()
