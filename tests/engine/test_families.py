"""Forwards shared by a base and its fine-tunes: one forward for their rows, each row
computed with its own model's weights (the same tokens as transformers on each)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from hf_models import hf_greedy
from test_reuse import fine_tune

from edgeserve import EdgeServer
from edgeserve.config import Config, EngineConfig, PoolConfig, TierConfig
from edgeserve.engine import families
from engine.spy import record_forwards

LLAMA_FT = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight")
# Every kind of hook: the embedding, a norm, a fused projection with its bias (q), the head.
BIAS_FT = ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
           "model.layers.1.self_attn.q_proj.bias", "model.layers.1.mlp.gate_proj.weight",
           "model.norm.weight", "lm_head.weight")


def server(store, families_on=True, policy="edgeserve") -> EdgeServer:
    return EdgeServer(config=Config(
        models=store, device="cpu", pool=PoolConfig(pool_size=64 << 20, block_size=4096),
        tiers=TierConfig(host_size=64 << 20, policy=policy),
        engine=EngineConfig(batch_families=families_on)))


@pytest.fixture
def store(tmp_path, tiny_store):
    root = tmp_path / "store"
    for arch in ("llama", "llama-bias", "qwen2"):
        shutil.copytree(tiny_store / arch, root / arch)
    fine_tune(root / "llama", root / "llama-ft1", LLAMA_FT, seed=1)
    fine_tune(root / "llama", root / "llama-ft2", LLAMA_FT[1:], seed=2)
    fine_tune(root / "llama-bias", root / "llama-bias-ft", BIAS_FT, seed=3)
    return root


async def run_together(es: EdgeServer, prompts: dict[str, list[int]], n: int
                       ) -> dict[str, list[int]]:
    for model in prompts:
        await es.load(model)
    outs = await asyncio.gather(*[es.complete(m, p, max_tokens=n, temperature=0,
                                              ignore_eos=True) for m, p in prompts.items()])
    return {m: out.token_ids for m, out in zip(prompts, outs, strict=True)}


async def test_fine_tunes_share_forwards_and_keep_their_own_outputs(store, monkeypatch):
    prompts = {"llama": [5, 8, 120, 33, 2], "llama-ft1": [3, 17, 40, 9],
               "llama-ft2": [3, 17, 40, 9], "qwen2": [7, 7, 7]}
    raw = record_forwards(monkeypatch)
    async with server(store) as es:
        got = await run_together(es, prompts, 8)
        es.pools["cpu"].check_integrity()
    seen = [ids for _, ids, _ in raw]
    for model, prompt in prompts.items():
        assert got[model] == hf_greedy(store / model, prompt, 8), model
    for ft in ("llama-ft1", "llama-ft2"):    # the base's weights would give other tokens
        assert got[ft] != hf_greedy(store / "llama", prompts[ft], 8)
    family = {"llama", "llama-ft1", "llama-ft2"}
    assert any(len(ids) > 1 for ids in seen)
    assert all(ids <= family or ids == {"qwen2"} for ids in seen)    # another base: its own
    assert sum(len(ids) == 3 for ids in seen) >= 4          # decode steps of all three at once


async def test_every_hook_replaces_a_members_rows(store, monkeypatch):
    """A fine-tune changing the embedding, a norm, a bias and the head (below the share a
    family needs by default, so the share is lowered here)."""
    monkeypatch.setattr(families, "SHARE", 0.0)
    prompts = {"llama-bias": [3, 17, 40, 9], "llama-bias-ft": [3, 17, 40, 9]}
    raw = record_forwards(monkeypatch)
    async with server(store) as es:
        got = await run_together(es, prompts, 8)
        leader = es.models["llama-bias"]
        share, names = families.differing(leader, es.models["llama-bias-ft"])
        es.pools["cpu"].check_integrity()
    seen = [ids for _, ids, _ in raw]
    assert 0 < share < 1 and "model.embed_tokens.weight" in names
    assert got["llama-bias-ft"] != got["llama-bias"]
    assert any(len(ids) == 2 for ids in seen)
    for model, prompt in prompts.items():
        assert got[model] == hf_greedy(store / model, prompt, 8), model


@pytest.mark.parametrize(("families_on", "policy"), [(False, "edgeserve"), (True, "ollama")])
async def test_no_shared_forward_when_off_or_nothing_shared(store, monkeypatch, families_on,
                                                            policy):
    raw = record_forwards(monkeypatch)
    async with server(store, families_on, policy) as es:
        await run_together(es, {"llama": [3, 17, 40], "llama-ft1": [5, 8, 9]}, 4)
    seen = [ids for _, ids, _ in raw]
    assert seen and all(len(ids) == 1 for ids in seen)


async def test_a_fine_tune_of_most_bytes_stays_apart(store, monkeypatch):
    async with server(store) as es:
        await es.load("llama-bias")
        await es.load("llama-bias-ft")
        a, b = es.models["llama-bias"], es.models["llama-bias-ft"]
        share, _ = families.differing(a, b)
        assert share < families.SHARE       # the embedding and head: most of its bytes
        assert len(families.step_groups([a, b, a], True, True)) == 2
        monkeypatch.setattr(families, "SHARE", share)
        assert families.step_groups([a, b, a], True, True) == [{id(a), id(b)}]
