"""Memory reuse across models: sharing, retention, tiers, eviction order, pressure."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from dataclasses import replace

import pytest
import torch
from hf_models import hf_greedy
from safetensors.torch import load_file, save_file

from edgeserve import EdgeServer
from edgeserve.arch import weight_plan
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig
from edgeserve.loader import read_spec, weight_views
from edgeserve.pool import PoolFull

FINE_TUNED = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight")


def fine_tune(base, path, names=FINE_TUNED, seed=1):
    """A copy of base with `names` changed: 2 of 21 tensors, about 90% identical."""
    shutil.copytree(base, path)
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in names:
        tensors[name] = tensors[name] + 0.05 * torch.randn(tensors[name].shape, generator=g)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def config(store, pool="64MiB", host="64MiB", policy="edgeserve") -> Config:
    return Config(models=store, device="cpu",
                  pool=PoolConfig(pool_size=int(pool.removesuffix("MiB")) << 20
                                  if pool.endswith("MiB") else int(pool), block_size=4096),
                  tiers=TierConfig(host_size=int(host.removesuffix("MiB")) << 20,
                                   policy=policy),
                  scheduler=SchedulerConfig(idle_hashing=False))   # hashes counted by loads


@pytest.fixture
def store(tmp_path, tiny_store):
    root = tmp_path / "store"
    for arch in ("llama", "qwen2", "mistral", "qwen3"):
        shutil.copytree(tiny_store / arch, root / arch)
    fine_tune(root / "llama", root / "llama-ft")
    return root


async def test_fine_tune_shares_identical_bytes(store):
    async with EdgeServer(config=config(store)) as es:
        await es.load("llama")
        pool = es.pools["cpu"]
        base = pool.bytes_by_kind()["weight"]
        report = await es.load("llama-ft")
        both = pool.bytes_by_kind()["weight"]
        assert both <= 1.15 * base
        assert report.bytes_from_device > 0.8 * report.bytes_total
        stats = es.stats()["devices"]["cpu"]
        assert stats["weight_bytes_unique"] == both
        assert stats["models"]["llama-ft"]["shared_bytes"] > 0.8 * base
        # Shared units serve both models correctly.
        prompt = [3, 14, 15, 92, 65]
        for model_id in ("llama", "llama-ft"):
            out = await es.complete(model_id, prompt, max_tokens=12, temperature=0,
                                    ignore_eos=True)
            assert out.token_ids == hf_greedy(store / model_id, prompt, 12)
        pool.check_integrity()


async def test_unload_then_reload_reads_nothing_from_disk(store):
    async with EdgeServer(config=config(store)) as es:
        first = await es.load("qwen2")
        assert first.bytes_from_disk == first.bytes_total > 0
        await es.unload("qwen2")
        again = await es.load("qwen2")
        assert again.bytes_from_disk == 0 and again.bytes_from_host == 0
        assert again.bytes_from_device == again.bytes_total
        es.pools["cpu"].check_integrity()


async def test_hashes_are_computed_once_per_file_and_follow_changes(store):
    async with EdgeServer(config=config(store)) as es:
        await es.load("qwen3")
        hashes = es.scheduler.hashes
        computed = hashes.computed
        await es.unload("qwen3")
    async with EdgeServer(config=config(store)) as es:        # a new process, same store
        await es.load("qwen3")
        assert es.scheduler.hashes.computed == 0             # read from the store's cache
        assert computed == 1
    fine_tune(store / "qwen3", store / "qwen3-ft", ("model.norm.weight",))
    file = store / "qwen3" / "model.safetensors"
    shutil.copy(store / "qwen3-ft" / "model.safetensors", file)   # the file changes
    async with EdgeServer(config=config(store)) as es:
        await es.load("qwen3")
        assert es.scheduler.hashes.computed == 1


def pool_for_two(store) -> int:
    """Pool bytes: two tiny models' weights and a little KV, not three models."""
    spec = read_spec(store / "llama")
    size = sum(4 * torch.Size(u.shape).numel() for u in weight_plan(spec).values())
    return int(2.6 * size)


async def test_eviction_follows_value_order_and_host_round_trip_is_exact(store):
    async with EdgeServer(config=config(store, pool=str(pool_for_two(store)))) as es:
        pool, sched = es.pools["cpu"], es.scheduler
        units = []
        pool.before_evict.insert(0, units.append)
        for model_id, requests in (("llama", 5), ("mistral", 1)):
            for _ in range(requests):
                await es.complete(model_id, [1, 2, 3], max_tokens=2)
            await es.unload(model_id)                        # retained, evictable
        await es.load("qwen2")                               # needs room: evicts
        assert units, "nothing was evicted"
        # Values compared at one instant (demand decays with time, evenly for all).
        evicted = [(sched.policy.value(u, sched.ctx), u.owner) for u in units]  # type: ignore[attr-defined]
        values = [v for v, _ in evicted]
        # cheapest loss first (up to the decay during this very comparison)
        assert all(b >= a * (1 - 1e-6) for a, b in itertools.pairwise(values))
        owners = [o for _, o in evicted]
        assert owners.index("mistral") < owners.index("llama") if "llama" in owners else True
        assert es.host is not None and len(es.host) > 0
        # The evicted units come back from the host tier, bit for bit.
        report = await es.load("mistral")
        assert report.bytes_from_host > 0
        model = es.models["mistral"]
        views = weight_views(pool, model.units, model.spec, model.dtype)
        tensors = load_file(store / "mistral" / "model.safetensors")
        for name, unit in weight_plan(model.spec).items():
            for part, first, rows in unit.slices():
                assert torch.equal(views[name][first:first + rows], tensors[part]), part
        pool.check_integrity()


async def test_pressure_unloads_idle_models_and_says_what_is_missing(store):
    async with EdgeServer(config=config(store, pool=str(pool_for_two(store)))) as es:
        for model_id in ("llama", "qwen2", "mistral", "llama"):   # more than fit at once
            out = await es.complete(model_id, [1, 2, 3], max_tokens=3, ignore_eos=True)
            assert out.usage.completion_tokens == 3
        es.pin("llama")
        es.pin("mistral")
        with pytest.raises(PoolFull, match="missing"):
            await es.load("qwen2")
        assert {"llama", "mistral"} <= set(es.models)        # pinned models stayed
        es.pools["cpu"].check_integrity()


async def test_ollama_like_policy_retains_nothing(store):
    async with EdgeServer(config=config(store, policy="ollama")) as es:
        await es.load("llama")
        await es.unload("llama")
        assert es.pools["cpu"].bytes_by_kind()["weight"] == 0
        again = await es.load("llama")
        assert again.bytes_from_disk == again.bytes_total
        await es.load("llama-ft")                            # no sharing either
        assert es.stats()["devices"]["cpu"]["models"]["llama-ft"]["shared_bytes"] == 0


async def test_corrupt_header_fails_only_that_load(store):
    (store / "bad").mkdir()
    shutil.copy(store / "llama" / "config.json", store / "bad" / "config.json")
    (store / "bad" / "model.safetensors").write_bytes(b"\xff" * 64)
    async with EdgeServer(config=config(store)) as es:
        running = asyncio.create_task(es.complete("llama", [1, 2], max_tokens=20,
                                                  ignore_eos=True))
        with pytest.raises(ValueError, match=r"bad/model\.safetensors"):
            await es.load("bad")
        assert (await running).usage.completion_tokens == 20
        es.pools["cpu"].check_integrity()


def weight_bytes(path) -> int:
    return sum(4 * torch.Size(u.shape).numel() for u in weight_plan(read_spec(path)).values())


async def test_a_load_reads_its_host_copies_though_making_room_demotes_others(store):
    """One model fits the pool and one the host tier: loading llama back evicts qwen2,
    whose demotion must not push out the llama copies this very load reads."""
    sizes = [weight_bytes(store / m) for m in ("llama", "qwen2")]
    assert sum(sizes) > pool_for_two(store) * 6 // 10 > max(sizes)
    cfg = config(store, pool=str(pool_for_two(store) * 6 // 10))
    cfg = replace(cfg, tiers=replace(cfg.tiers, host_size=max(sizes) * 21 // 20))
    async with EdgeServer(config=cfg) as es:
        reports = [await es.load(m) for m in ("llama", "qwen2", "llama", "qwen2")]
        # Every reload comes back from the device and the host tier, nothing from disk.
        for report in reports[2:]:
            assert report.bytes_from_disk == 0 and report.bytes_from_host > 0
        assert es.host is not None and es.host.used <= es.host.capacity
        es.pools["cpu"].check_integrity()


def test_the_host_tier_keeps_protected_copies_and_refuses_what_would_drop_them():
    from edgeserve.tiers import HostTier

    host = HostTier(capacity=100)
    assert host.put("a", torch.zeros(60, dtype=torch.uint8))
    with host.protect(["a"]):
        assert not host.put("b", torch.zeros(60, dtype=torch.uint8))   # only "a" to drop
        assert "a" in host and "b" not in host
        assert host.put("c", torch.zeros(30, dtype=torch.uint8))       # room left: kept
    assert host.put("b", torch.zeros(60, dtype=torch.uint8))           # "a" may go now
    assert "a" not in host and "b" in host and host.used <= 100


def test_the_host_tier_reuses_a_dropped_buffer_only_when_nobody_reads_it():
    from edgeserve.tiers import HostTier

    host = HostTier(capacity=100)
    host.put("a", torch.arange(60, dtype=torch.uint8))
    reading = host.get("a")                          # a load still copies from it
    assert reading is not None
    host.put("b", torch.ones(60, dtype=torch.uint8))
    assert "a" not in host and torch.equal(reading, torch.arange(60, dtype=torch.uint8))
    del reading
    address = host.get("b").data_ptr()               # type: ignore[union-attr]
    host.put("c", torch.full((60,), 7, dtype=torch.uint8))
    c = host.get("c")
    assert c is not None and c.data_ptr() == address and torch.equal(c, torch.full_like(c, 7))


@pytest.mark.parametrize("policy", ["ollama", "no-sharing"])
async def test_a_policy_that_never_shares_never_hashes_a_file_in_a_pass_of_its_own(
        store, policy):
    """Hashes only find equal bytes in other models: a load under a policy that shares
    nothing takes the hashes its reader threads compute anyway, and never reads a file
    a second time to hash it, even when it must make room (or places beside residents)."""
    cfg = config(store, pool=str(pool_for_two(store) * 6 // 10), policy=policy)
    async with EdgeServer(config=cfg) as es:
        for model_id in ("llama", "qwen2", "mistral", "llama"):
            await es.complete(model_id, [1, 2, 3], max_tokens=2)
        hashes = es.scheduler.hashes
        assert hashes.streamed >= 3 and hashes.computed == hashes.streamed
        es.pools["cpu"].check_integrity()
