"""Expert offload on the cases a checkpoint or a setting can bring: every MoE architecture
and dtype, budgets that clamp, dense-only configs, overflowing prefills, a full pool, two
offloaded models at once, stacked checkpoints and bad settings. With substitution off the
greedy tokens always equal those of the model with every expert resident."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from hf_models import load_resident, make_model

from edgeserve import EdgeServer
from edgeserve.config import Config, ExpertConfig, PoolConfig
from edgeserve.experts.cache import ExpertCache
from edgeserve.experts.offload import ExpertOffload
from edgeserve.pool import BlockPool, UnitKind

PROMPTS = [[5, 9, 14, 3, 17, 44, 61, 2, 90, 100, 11], [22, 7, 1, 8, 30], [40, 41]]
LONG = [(7 * i) % 300 + 3 for i in range(48)]
POOL = dict(device="cpu", pool_size="32MiB", block_size="4KiB")
MODELS = {   # name: (arch, dtype, overrides)
    "mixtral": ("mixtral", torch.float32, {}),
    "qwen2-moe": ("qwen2-moe", torch.float32, {}),
    "olmoe": ("olmoe", torch.float32, {}),
    "qwen3-moe": ("qwen3-moe", torch.float32, {}),
    "qwen2-moe-bf16": ("qwen2-moe", torch.bfloat16, {}),
    "qwen3-moe-bf16": ("qwen3-moe", torch.bfloat16, {}),
    "mixtral-top4": ("mixtral", torch.float32, dict(num_experts_per_tok=4)),
    "qwen2-moe-top1": ("qwen2-moe", torch.float32, dict(num_experts_per_tok=1)),
    "qwen3-moe-dense": ("qwen3-moe", torch.float32, dict(mlp_only_layers=[0, 1, 2, 3])),
    "mixtral-stacked": ("mixtral", torch.float32, dict(stacked_experts=True)),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe-cases")
    for name, (arch, dtype, overrides) in MODELS.items():
        make_model(arch, root / name, seed=5, dtype=dtype, **overrides)
    shutil.copytree(root / "mixtral", root / "mixtral-copy")   # equal bytes: shared units
    return root


def server(store: Path, model: str, **kwargs) -> EdgeServer:
    dtype = "bfloat16" if model.endswith("bf16") else None
    return EdgeServer(models=store, dtype=dtype, **POOL, **kwargs)


async def generate(es: EdgeServer, model: str, prompts: list[list[int]] = PROMPTS,
                   n: int = 6) -> list[list[int]]:
    outs = await asyncio.gather(*[es.complete(model, p, max_tokens=n, temperature=0,
                                              ignore_eos=True) for p in prompts])
    return [o.token_ids for o in outs]


_references: dict[tuple[str, int], list[list[int]]] = {}


async def reference(store: Path, model: str, n: int = 6) -> list[list[int]]:
    """Greedy tokens with every expert resident (computed once per model)."""
    if (model, n) not in _references:
        async with server(store, model) as es:
            _references[(model, n)] = await generate(es, model, n=n)
    return _references[(model, n)]


def experts_stats(es: EdgeServer, model: str) -> dict:
    return es.stats()["devices"]["cpu"]["models"][model]["experts"]


@pytest.mark.parametrize(("model", "budget", "policy", "prefetch"), [
    ("mixtral", 0.01, "lru", True),
    ("qwen2-moe", 0.3, "importance", False),
    ("olmoe", 0.01, "importance", True),
    ("qwen3-moe", 0.6, "lru", False),
    ("qwen2-moe-bf16", 0.01, "importance", True),
    ("qwen3-moe-bf16", 0.3, "lru", True),
    ("mixtral-top4", 0.01, "lru", True),       # capacity clamps to the 4 a token needs
    ("qwen2-moe-top1", 0.01, "importance", False),
])
async def test_misses_never_change_tokens(store, model, budget, policy, prefetch):
    expected = await reference(store, model)
    dtype = "bfloat16" if model.endswith("bf16") else None
    config = Config(models=store, device="cpu", dtype=dtype, pool=PoolConfig(32 << 20, 4096),
                    experts=ExpertConfig(budget=budget, policy=policy, prefetch=prefetch))
    async with EdgeServer(config=config) as es:
        assert await generate(es, model) == expected
        offload = es.models[model].offload
        stats = experts_stats(es, model)
        assert stats["misses"] > 0 and stats["substitutions"] == 0
        assert stats["capacity"] >= es.models[model].spec.experts_per_token
        assert (stats["prefetches"] > 0) == (prefetch and len(offload.layers) > 1)
        assert len(offload.units) == stats["resident_experts"] <= stats["capacity"]
        assert 0 < stats["resident_bytes"] <= es.pools["cpu"].bytes_by_kind()["expert"]
        es.pools["cpu"].check_integrity()


async def test_a_config_with_no_sparse_layer_is_served(store):
    expected = await reference(store, "qwen3-moe-dense")
    async with server(store, "qwen3-moe-dense", expert_budget=0.5,
                      expert_policy="importance+substitution") as es:
        assert await generate(es, "qwen3-moe-dense") == expected
        assert experts_stats(es, "qwen3-moe-dense")["misses"] == 0
        es.pools["cpu"].check_integrity()


async def test_a_prefill_overflow_leaves_once_the_forward_is_done(store):
    async with server(store, "mixtral-top4", expert_budget=0.01, expert_policy="lru") as es:
        await es.complete("mixtral-top4", LONG, max_tokens=1, temperature=0)
        offload = es.models["mixtral-top4"].offload
        capacity = offload.cache.capacity
        assert len(offload.units) <= capacity and len(offload.cache.resident) <= capacity
        assert es.pools["cpu"].bytes_by_kind()["expert"] <= capacity * (
            offload.cache.expert_bytes + 2 * es.pools["cpu"].block_size)
        es.pools["cpu"].check_integrity()


async def test_a_full_pool_serves_misses_from_host_memory(store, monkeypatch):
    expected = await reference(store, "mixtral")
    unplaced: list[tuple[int, int]] = []
    fetch = ExpertOffload._fetch

    def counted(self: ExpertOffload, key: tuple[int, int]) -> None:
        fetch(self, key)
        if key not in self.units:
            unplaced.append(key)

    monkeypatch.setattr(ExpertOffload, "_fetch", counted)
    async with server(store, "mixtral", expert_budget=0.3, expert_policy="lru") as es:
        await es.load("mixtral")
        pool = es.pools["cpu"]
        filler = await es.engine.run(lambda: pool.allocate(
            UnitKind.WEIGHT, pool.free_bytes - 16 * pool.block_size, owner="filler"))
        assert await generate(es, "mixtral") == expected
        assert unplaced                              # some misses found no room
        offload = es.models["mixtral"].offload
        assert set(offload.units) == offload.cache.resident
        pool.check_integrity()
        await es.engine.run(pool.release, filler)


async def test_two_offloaded_models_sharing_units(store):
    expected = await reference(store, "mixtral")
    expected_qwen = await reference(store, "qwen2-moe")
    async with server(store, "mixtral", expert_budget=0.3,
                      expert_policy="importance+substitution") as es:
        for model in ("mixtral", "mixtral-copy", "qwen2-moe"):
            await es.load(model)
        pool = es.pools["cpu"]
        first = await asyncio.gather(generate(es, "mixtral"), generate(es, "mixtral-copy"),
                                     generate(es, "qwen2-moe"))
        pool.check_integrity()
        await es.unload("mixtral")
        pool.check_integrity()
        assert await generate(es, "mixtral-copy") == first[1]
        await es.load("mixtral")                    # reload after unload
        assert await generate(es, "mixtral") == first[0]
        metrics = es.metrics.render().decode()
        for model in ("mixtral", "mixtral-copy", "qwen2-moe"):
            assert f'edgeserve:expert_hit_rate{{model_name="{model}"}}' in metrics
            assert experts_stats(es, model)["policy"] == "importance+substitution"
        for model in ("mixtral", "mixtral-copy", "qwen2-moe"):
            await es.unload(model)
        pool.check_integrity()
        assert pool.bytes_by_kind()["expert"] == 0 or all(
            u.pins == 0 for u in pool.units.values() if u.kind == UnitKind.EXPERT)
    async with server(store, "mixtral", expert_budget=0.3, expert_policy="lru") as es:
        assert await generate(es, "mixtral") == expected
        assert await generate(es, "qwen2-moe") == expected_qwen


def test_bad_settings_are_refused_before_anything_changes(store):
    pool = BlockPool("cpu", 16 << 20, 4096)
    model = load_resident("mixtral", store / "mixtral", pool)
    names = set(model.units)
    for budget, policy, match in ((0.5, "fifo", "policy"), (0.0, "lru", "budget"),
                                  (1.5, "lru", "budget")):
        with pytest.raises(ValueError, match=match):
            ExpertOffload(model, budget, policy)
        assert set(model.units) == names
    model.offload = ExpertOffload(model, 0.5, "lru")
    with pytest.raises(ValueError, match="already"):
        ExpertOffload(model, 0.5, "lru")
    model.release(retain=False)
    stacked = load_resident("mixtral-stacked", store / "mixtral-stacked", pool)
    with pytest.raises(ValueError, match="stacked"):
        ExpertOffload(stacked, 0.5, "lru")
    stacked.release(retain=False)
    pool.check_integrity()
    assert pool.bytes_by_kind()["expert"] == 0


def test_trim_and_forget():
    cache = ExpertCache(2, 4, capacity=2, policy="lru", expert_bytes=10)
    routed = cache.route(0, torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5))
    assert len(cache.resident) == 4 and routed.evict == []      # all four in use: overflow
    assert len(cache.trim()) == 2 and len(cache.resident) == 2
    cache.prefetch(1, [3])
    cache.forget((1, 3))                    # its copy could not be placed
    cache.route(1, torch.tensor([[3]]), torch.ones(1, 1))       # a miss, then a hit
    cache.route(1, torch.tensor([[3]]), torch.ones(1, 1))
    assert cache.stats.prefetch_hits == 0


class _ScanCache(ExpertCache):
    """The victim found by a scan of every resident expert each time (the reference)."""

    def _victim(self, protected: set[tuple[int, int]]
                ) -> tuple[float, tuple[int, int]] | None:
        candidates = [k for k in self.resident if k not in protected]
        if not candidates:
            return None
        table = self.importance.table()
        score = (lambda k: 0.0) if self.policy == "lru" else (lambda k: table[k[0]][k[1]])
        key = min(candidates, key=lambda k: (score(k), self._last_use[k]))
        return score(key), key


@pytest.mark.parametrize("policy", ["lru", "importance", "importance+substitution"])
def test_victims_from_the_heap_equal_a_full_scan(policy):
    layers, experts = 3, 6
    g = torch.Generator().manual_seed(7)
    sim = torch.rand(layers, experts, experts, generator=g)
    caches = [cls(layers, experts, capacity=5, policy=policy, expert_bytes=1, similarity=sim,
                  threshold=0.2) for cls in (ExpertCache, _ScanCache)]
    for cache in caches:
        cache.warm([(n, e) for e in range(experts) for n in range(layers)])
    for step in range(60):
        layer, tokens = step % layers, 1 + step % 4
        ids = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2, generator=g)
        demand = torch.rand(experts, generator=g).tolist()
        guess = torch.randperm(experts, generator=g)[:3].tolist()
        outs = []
        for cache in caches:
            routed = cache.route(layer, ids, weights)
            guessed = cache.prefetch((layer + 1) % layers, guess, demand)
            outs.append((routed, guessed, cache.trim() if step % 5 == 4 else None,
                         set(cache.resident)))
        assert outs[0] == outs[1]
    assert caches[0].stats == caches[1].stats


async def test_a_pool_too_small_for_every_expert_loads_within_the_budget(store):
    expected = await reference(store, "mixtral")
    async with server(store, "mixtral") as es:
        await es.load("mixtral")
        kinds = es.pools["cpu"].bytes_by_kind()
    size = kinds["weight"] + int(kinds["expert"] * 0.4) + (128 << 10)
    assert size < kinds["weight"] + kinds["expert"]      # every expert would not fit
    config = Config(models=store, device="cpu", pool=PoolConfig(size // 4096 * 4096, 4096),
                    experts=ExpertConfig(budget=0.4, policy="lru"))
    async with EdgeServer(config=config) as es:
        report = await es.load("mixtral")
        # every expert read, those beyond the budget into host memory; units are exact
        # bytes, the pool's kinds whole blocks
        assert report.bytes_total == report.bytes_from_disk
        assert kinds["weight"] + kinds["expert"] - 64 * 4096 < report.bytes_total <= \
            kinds["weight"] + kinds["expert"]
        assert await generate(es, "mixtral") == expected
        stats = experts_stats(es, "mixtral")
        assert stats["misses"] > 0 and stats["resident_experts"] <= stats["capacity"]
        pool = es.pools["cpu"]
        held = pool.bytes_by_kind()
        assert es.stats()["devices"]["cpu"]["models"]["mixtral"]["bytes"] == \
            held["weight"] + held["expert"]              # its experts on the device counted
        pool.check_integrity()


async def test_a_model_whose_experts_cannot_be_offloaded_leaves_nothing_pinned(store):
    async with server(store, "mixtral-stacked", expert_budget=0.5) as es:
        for _ in range(2):
            with pytest.raises(ValueError, match="stacked"):
                await es.load("mixtral-stacked")
        pool = es.pools["cpu"]
        assert "mixtral-stacked" not in es.models
        assert all(u.pins == 0 for u in pool.units.values())
        pool.check_integrity()


async def test_a_reload_finds_the_experts_it_kept_resident(store):
    expected = await reference(store, "mixtral")
    async with server(store, "mixtral", expert_budget=0.5, expert_policy="lru") as es:
        first = await es.load("mixtral")
        model = es.models["mixtral"]
        placed = model.weight_bytes + sum(u.nbytes for pair in model.offload.units.values()
                                          for u in pair)      # weights + experts kept at load
        await es.unload("mixtral")
        pool = es.pools["cpu"]
        assert all(u.pins == 0 for u in pool.units.values())
        again = await es.load("mixtral")
        assert again.bytes_from_device == placed            # found resident, not read again
        assert again.bytes_from_disk == first.bytes_from_disk - placed
        assert await generate(es, "mixtral") == expected
        await es.unload("mixtral")                          # experts fetched since: released
        assert all(u.key is not None for u in pool.units.values() if u.kind == "expert")
        assert await generate(es, "mixtral") == expected
        pool.check_integrity()
