"""Expert offload over quantized experts: a miss moves the quantized bytes (2-4x fewer than
float ones) and the tokens equal those of the same quantized model with every expert
resident, whether the experts beyond the budget are read into host memory at load or
released from the pool after it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hf_models import make_model

from edgeserve import EdgeServer
from edgeserve.config import Config, ExpertConfig, PoolConfig
from edgeserve.quant.linear import QWeight

PROMPTS = [[5, 9, 14, 3, 17, 44, 61, 2, 90, 100, 11], [22, 7, 1, 8, 30], [40, 41]]
# Quantization takes whole groups of 32 inputs: expert widths that are multiples of 32.
MODELS = {"mixtral": ("mixtral", dict(intermediate_size=128)),
          "qwen3-moe": ("qwen3-moe", dict(moe_intermediate_size=64))}
# Bytes a weight against float32: int8 1.125 / 4, int4 0.625 / 4, plus per-unit alignment.
SHARE = {"int8": 0.3, "int4": 0.2}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe-quant")
    for name, (arch, widths) in MODELS.items():
        make_model(arch, root / name, seed=7, **widths)
    return root


def config(store: Path, budget: float, pool: int = 32 << 20, policy: str = "lru",
           threshold: float = 0.1) -> Config:
    return Config(models=store, device="cpu", pool=PoolConfig(pool, 4096),
                  experts=ExpertConfig(budget=budget, policy=policy, threshold=threshold))


async def generate(es: EdgeServer, model: str) -> list[list[int]]:
    outs = await asyncio.gather(*[es.complete(model, p, max_tokens=6, temperature=0,
                                              ignore_eos=True) for p in PROMPTS])
    return [o.token_ids for o in outs]


async def expert_bytes(store: Path, model: str) -> int:
    async with EdgeServer(config=config(store, 1.0)) as es:
        await es.load(model)
        return int(es.pools["cpu"].bytes_by_kind()["expert"])


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("scheme", ["int8", "int4"])
async def test_quantized_misses_move_quantized_bytes_and_keep_tokens(store, model, scheme):
    tagged = f"{model}:{scheme}"
    async with EdgeServer(config=config(store, 1.0)) as es:
        expected = await generate(es, tagged)
    float_experts = await expert_bytes(store, model)
    async with EdgeServer(config=config(store, 0.3)) as es:
        assert await generate(es, tagged) == expected
        resident = es.models[tagged]
        offload = resident.offload
        assert offload is not None and resident.schemes
        g, d = offload.weights(*next(iter(offload.units)))
        assert isinstance(g, QWeight) and isinstance(d, QWeight) and g.scheme == d.scheme
        stats = es.stats()["devices"]["cpu"]["models"][tagged]["experts"]
        assert stats["misses"] > 0 and stats["substitutions"] == 0
        per_copy = stats["bytes_moved"] / (stats["misses"] + stats["prefetches"])
        experts = len(offload.layers) * resident.spec.num_experts
        assert per_copy <= SHARE[scheme] * float_experts / experts
        es.pools["cpu"].check_integrity()
        await es.unload(tagged)
        es.pools["cpu"].check_integrity()


async def test_experts_beyond_a_small_pool_are_read_quantized_into_host_memory(store):
    async with EdgeServer(config=config(store, 1.0)) as es:
        expected = await generate(es, "mixtral:int8")
        kinds = es.pools["cpu"].bytes_by_kind()
    size = (kinds["weight"] + int(kinds["expert"] * 0.4) + (128 << 10)) // 4096 * 4096
    assert size < kinds["weight"] + kinds["expert"]      # every expert would not fit
    async with EdgeServer(config=config(store, 0.4, pool=size)) as es:
        report = await es.load("mixtral:int8")
        assert report.bytes_total == report.bytes_from_disk      # the cached int8 folder
        assert report.bytes_total <= kinds["weight"] + kinds["expert"]
        assert await generate(es, "mixtral:int8") == expected
        assert es.stats()["devices"]["cpu"]["models"]["mixtral:int8"]["experts"]["misses"] > 0
        es.pools["cpu"].check_integrity()


async def test_substitution_compares_quantized_experts_by_their_values(store):
    # Every miss below the threshold 1.01 is substituted by the most similar resident expert.
    settings = config(store, 0.25, policy="importance+substitution", threshold=1.01)
    async with EdgeServer(config=settings) as es:
        await generate(es, "qwen3-moe:int8")
        stats = es.stats()["devices"]["cpu"]["models"]["qwen3-moe:int8"]["experts"]
        assert stats["substitutions"] > 0
        es.pools["cpu"].check_integrity()
