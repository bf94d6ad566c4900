"""A MoE model with half its experts on the device: misses are fetched, never skipped."""

from __future__ import annotations

import asyncio

import pytest
from hf_models import make_model

from edgeserve import EdgeServer
from edgeserve.experts.offload import ExpertOffload

PROMPTS = [[5, 9, 14, 3], [22, 7, 1, 8, 30, 2, 11], [40, 41]]


@pytest.fixture(scope="module")
def moe_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    make_model("mixtral", root / "mixtral", seed=3)
    return root


async def generate(es: EdgeServer) -> list[list[int]]:
    outs = await asyncio.gather(*[es.complete("mixtral", p, max_tokens=16, temperature=0,
                                              ignore_eos=True) for p in PROMPTS])
    return [o.token_ids for o in outs]


async def offloaded(es: EdgeServer, budget: float, policy: str,
                    threshold: float = 0.1) -> ExpertOffload:
    model = es.models["mixtral"]

    def attach() -> ExpertOffload:
        model.offload = ExpertOffload(model, budget, policy, threshold)
        return model.offload

    return await es.engine.run(attach)       # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["lru", "importance"])
async def test_half_budget_without_substitution_is_exact(moe_store, policy):
    async with EdgeServer(models=moe_store, device="cpu", pool_size="64MiB",
                          block_size="4KiB") as es:
        await es.load("mixtral")
        pool = es.pools["cpu"]
        full_experts = pool.bytes_by_kind()["expert"]
        reference = await generate(es)
        offload = await offloaded(es, 0.5, policy)
        assert pool.bytes_by_kind()["expert"] <= full_experts // 2 + 4096 * 2
        assert await generate(es) == reference
        stats = offload.stats()
        assert stats["misses"] > 0 and stats["hits"] > 0 and stats["substitutions"] == 0
        assert 0 < stats["hit_rate"] < 1 and stats["bytes_moved_per_token"] > 0
        assert len(offload.units) <= offload.cache.capacity
        pool.check_integrity()
        await es.unload("mixtral")
        pool.check_integrity()


async def test_substitution_happens_only_below_the_threshold(moe_store):
    async with EdgeServer(models=moe_store, device="cpu", pool_size="64MiB",
                          block_size="4KiB") as es:
        await es.load("mixtral")
        never = await offloaded(es, 0.25, "importance+substitution", threshold=0.0)
        assert list((moe_store / ".edgeserve" / "similarity").glob("*.pt"))   # cached in store
        await generate(es)
        assert never.stats()["substitutions"] == 0      # no gate weight is below 0
        assert never.stats()["prefetches"] > 0 and 0 <= never.stats()["prefetch_accuracy"] <= 1
        es.models["mixtral"].release()                  # fresh model state for the next
    async with EdgeServer(models=moe_store, device="cpu", pool_size="64MiB",
                          block_size="4KiB") as es:
        await es.load("mixtral")
        always = await offloaded(es, 0.25, "importance+substitution", threshold=1.01)
        await generate(es)
        stats = always.stats()
        assert stats["substitutions"] > 0       # misses below the threshold are substituted
        assert stats["prefetches"] == 0         # no use copying what a miss would substitute
        es.pools["cpu"].check_integrity()


async def test_expert_budget_from_the_server_config(moe_store):
    async with EdgeServer(models=moe_store, device="cpu", pool_size="64MiB",
                          block_size="4KiB") as es:
        reference = await generate(es)
    async with EdgeServer(models=moe_store, device="cpu", pool_size="64MiB", block_size="4KiB",
                          expert_budget=0.5, expert_policy="importance") as es:
        assert await generate(es) == reference
        experts = es.stats()["devices"]["cpu"]["models"]["mixtral"]["experts"]
        assert experts["policy"] == "importance" and experts["misses"] > 0
        es.pools["cpu"].check_integrity()
    with pytest.raises(ValueError, match="budget"):
        EdgeServer(models=moe_store, expert_budget=1.5)
