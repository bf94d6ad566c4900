"""CUDA paths against their CPU twins (marked gpu: skipped without a CUDA device)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from edgeserve import EdgeServer
from edgeserve.pool import BlockPool, UnitKind
from edgeserve.sampling import SamplingParams, make_generator, sample

pytestmark = pytest.mark.gpu


def test_cuda_pool_views_and_compaction():
    pool = BlockPool("cuda:0", 64 << 20, 2 << 20)
    assert pool.slab is not None and pool.slab.is_cuda
    a = pool.allocate(UnitKind.WEIGHT, 3 << 20)
    b = pool.allocate(UnitKind.WEIGHT, 5 << 20)
    data = torch.randn(5 << 18, device="cuda")
    pool.view(b, torch.float32, data.shape).copy_(data)
    pool.release(a)
    big = pool.allocate(UnitKind.WEIGHT, (pool.free_bytes // (2 << 20)) * (2 << 20))
    assert b.start == 0 and big.alive
    assert torch.equal(pool.view(b, torch.float32, data.shape), data)
    pool.check_integrity()


async def _greedy(store, device: str, prompts: list[list[int]]) -> list[list[int]]:
    async with EdgeServer(models=store, device=device, pool_size="256MiB", dtype="float32",
                          block_size="64KiB") as es:
        outs = await asyncio.gather(*[es.complete("llama", p, max_tokens=24, temperature=0,
                                                  ignore_eos=True) for p in prompts])
        for pool in es.pools.values():
            pool.check_integrity()
        return [o.token_ids for o in outs]


async def test_cuda_generation_equals_cpu(tiny_store):
    prompts = [[1, 2, 3], list(range(5, 30)), [7] * 9]
    assert await _greedy(tiny_store, "cuda:0", prompts) == await _greedy(tiny_store, "cpu",
                                                                           prompts)


def test_cuda_seeded_sampling_matches_itself():
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=3)]
    logits = torch.randn(1, 500, device="cuda")
    first = sample(logits, params, [make_generator(params[0], "cuda")])
    again = sample(logits, params, [make_generator(params[0], "cuda")])
    assert torch.equal(first, again) and first.is_cuda


async def test_cuda_bf16_default_serves(demo_store):
    async with EdgeServer(models=demo_store, device="cuda", pool_size="512MiB") as es:
        out = await es.chat("demo-llama", [{"role": "user", "content": "hi"}], max_tokens=8,
                            temperature=0, ignore_eos=True)
        assert len(out.token_ids) == 8
        assert es.models["demo-llama"].dtype == torch.bfloat16
