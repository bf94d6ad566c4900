"""Prefix KV reuse: equal outputs with reuse on and off, sharing, lifetime, pressure, tiers."""

from __future__ import annotations

import asyncio
import itertools
import shutil

import pytest
import torch
from hf_models import make_model

from edgeserve import EdgeServer
from edgeserve.kv import PrefixState
from edgeserve.pool import BlockPool, UnitKind

P = 8   # tokens per page of tiny llama with 4 KiB blocks (2 layers x 2 x 32 x fp32)


def tokens(n: int, seed: int, vocab: int = 320) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def server(store, reuse: bool = True, **kw) -> EdgeServer:
    return EdgeServer(models=store, device="cpu", pool_size=kw.pop("pool_size", "64MiB"),
                      block_size="4KiB", prefix_cache=reuse, **kw)


def kv_units(pool: BlockPool, pinned: bool | None = None) -> list:
    return [u for u in pool.units_of(UnitKind.KV) if pinned is None or bool(u.pins) == pinned]


async def conversation(es: EdgeServer, model: str, turns: int = 4, **sampling) -> list:
    """Each turn's prompt is the last prompt, its reply and a new user message."""
    prompt, outs = tokens(21, 1), []
    for turn in range(turns):
        out = await es.complete(model, prompt, max_tokens=11, ignore_eos=True, **sampling)
        outs.append(out)
        prompt = prompt + out.token_ids + tokens(5 + 3 * turn, 10 + turn)
    return outs


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    for arch in ("llama", "mistral", "qwen3"):
        shutil.copytree(tiny_store / arch, root / arch)
    make_model("mixtral", root / "mixtral", seed=101)
    return root


@pytest.mark.parametrize("model", ["llama", "mistral", "qwen3", "mixtral"])
async def test_multi_turn_greedy_is_identical_with_reuse_on_and_off(store, model):
    async with server(store, reuse=False) as off:
        expected = await conversation(off, model, temperature=0)
        assert all(o.usage.cached_tokens == 0 for o in expected)
    async with server(store) as on:
        got = await conversation(on, model, temperature=0)
        pool = on.pools["cpu"]
        pool.check_integrity()
        assert not kv_units(pool, pinned=True)
        page = on.models[model].kv.layout.page_tokens
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert got[0].usage.cached_tokens == 0
    for before, after in itertools.pairwise(got):
        # Every full page of the last prompt and reply is found again (the last token of
        # the reply was never fed back, so its page may be partial).
        known = before.usage.prompt_tokens + before.usage.completion_tokens - 1
        assert after.usage.cached_tokens == known // page * page > 0


async def test_a_shared_prefix_ending_mid_page(store):
    prefix = tokens(8 * P + 3, 2)                 # 8 pages and 3 tokens into the ninth
    first, second = prefix + tokens(9, 3), prefix + tokens(9, 4)
    async with server(store, reuse=False) as off:
        expected = [await off.complete("llama", p, max_tokens=6, temperature=0)
                    for p in (first, second)]
    async with server(store) as on:
        got = [await on.complete("llama", p, max_tokens=6, temperature=0)
               for p in (first, second)]
        on.pools["cpu"].check_integrity()
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert got[1].usage.cached_tokens == 8 * P


async def test_the_last_prompt_token_is_always_computed(store):
    prompt = tokens(4 * P, 5)                     # a whole number of pages
    async with server(store) as es:
        a = await es.complete("llama", prompt, max_tokens=3, temperature=0)
        b = await es.complete("llama", prompt, max_tokens=3, temperature=0)
    assert b.usage.cached_tokens == 3 * P and b.token_ids == a.token_ids


async def test_seeded_sampling_is_identical_with_reuse(store):
    prompt = tokens(5 * 5 + 2, 6)                 # qwen3 (head_dim 24): 5 tokens a page
    args = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    async with server(store, reuse=False) as off:
        expected = await off.complete("qwen3", prompt, **args)
    async with server(store) as on:
        await on.complete("qwen3", prompt, max_tokens=1)          # leaves the prefix behind
        got = await on.complete("qwen3", prompt, **args)
    assert got.usage.cached_tokens == 5 * 5
    assert got.token_ids == expected.token_ids


async def test_hits_survive_unload_and_never_cross_weights(store, tmp_path):
    from test_reuse import fine_tune

    root = tmp_path / "store"
    shutil.copytree(store / "llama", root / "llama")
    fine_tune(root / "llama", root / "llama-ft",
              names=("model.layers.1.self_attn.k_proj.weight",))
    prompt = tokens(6 * P + 1, 7)
    async with server(root) as es:
        base = await es.complete("llama", prompt, max_tokens=4, temperature=0)
        ft = await es.complete("llama-ft", prompt, max_tokens=4, temperature=0)
        assert ft.usage.cached_tokens == 0            # its attention differs: never a hit
        ft_again = await es.complete("llama-ft", prompt, max_tokens=4, temperature=0)
        assert ft_again.usage.cached_tokens == 6 * P and ft_again.token_ids == ft.token_ids
        await es.unload("llama")
        await es.unload("llama-ft")
        await es.load("llama")
        again = await es.complete("llama", prompt, max_tokens=4, temperature=0)
        assert again.usage.cached_tokens == 6 * P and again.token_ids == base.token_ids
        es.pools["cpu"].check_integrity()


async def test_concurrent_sequences_share_their_prefix_pages(store):
    prefix = tokens(8 * P, 8)
    prompts = [prefix + tokens(5, 20 + i) for i in range(4)]
    peaks = {}
    for reuse in (False, True):
        async with server(store, reuse=reuse) as es:
            await es.load("llama")
            pool = es.pools["cpu"]
            pool.reset_peak()
            outs = await asyncio.gather(*[es.complete("llama", p, max_tokens=4, temperature=0,
                                                      ignore_eos=True) for p in prompts])
            peaks[reuse] = pool.peak_by_kind()["kv"]
            page = pool.blocks_for(es.models["llama"].kv.layout.page_bytes) * pool.block_size
            pool.check_integrity()
        if reuse:
            assert sorted(o.usage.cached_tokens for o in outs) == [0, 8 * P, 8 * P, 8 * P]
    # 69 prompt tokens and 3 of the 4 reply tokens fed back: 9 pages each alone; shared,
    # 8 pages once and 1 private page per sequence.
    assert peaks[False] == 4 * 9 * page
    assert peaks[True] == (8 + 4 * 1) * page


async def test_pressure_evicts_retained_pages_first_and_restores_them_exactly(store, caplog):
    caplog.set_level("INFO", logger="edgeserve.engine")
    prompt = tokens(24 * P + 2, 9)
    async with server(store, reuse=False, pool_size="700KiB") as off:
        expected = await off.complete("llama", prompt, max_tokens=5, temperature=0)
    async with server(store, pool_size="700KiB", host_size="16MiB") as es:
        first = await es.complete("llama", prompt, max_tokens=5, temperature=0)
        pool = es.pools["cpu"]
        chain = PrefixState().extend(es.models["llama"].kv_identity,
                                     prompt + first.token_ids[:-1], P)
        kept = {u.key: pool.raw(u).clone() for u in kv_units(pool, pinned=False)}
        assert set(kept) == set(chain) and len(chain) == 24
        # A request that needs 12 pages more than are free: retained pages make room (the
        # tail of the prefix first), and no running sequence is preempted for them.
        other = tokens((pool.free_bytes // 4096 + 12) * P - 5, 10)
        await es.complete("llama", other, max_tokens=5, temperature=0)
        assert "preempting" not in caplog.text
        on_device = {u.key for u in kv_units(pool)}
        left = [key for key in chain if key in on_device]
        assert len(left) <= len(chain) - 12 and left == chain[:len(left)]
        kv_host = es.scheduler.kv_host
        gone = set(chain) - on_device
        assert gone <= set(kv_host.owners) and kv_host.demoted >= len(gone)
        got = await es.complete("llama", prompt, max_tokens=5, temperature=0)
        assert got.usage.cached_tokens == 24 * P and got.token_ids == expected.token_ids
        assert kv_host.restored >= min(len(gone), 24)
        for unit in kv_units(pool):
            if unit.key in kept:
                assert torch.equal(pool.raw(unit), kept[unit.key])
        assert sum(u.key in kept for u in kv_units(pool)) >= 24
        pool.check_integrity()


async def test_nothing_leaks(store):
    async with server(store, host_size="16MiB") as es:
        await conversation(es, "llama", turns=3, temperature=0)
        await conversation(es, "mistral", turns=2, temperature=0)
        pool = es.pools["cpu"]
        assert not kv_units(pool, pinned=True) and kv_units(pool, pinned=False)
        kv = es.stats()["devices"]["cpu"]["kv"]
        assert kv["llama"]["running_bytes"] == 0 and kv["llama"]["retained_bytes"] > 0
        assert pool.evict() > 0                    # every retained page goes to the host tier
        assert pool.bytes_by_kind()["kv"] == 0
        host = es.stats()["prefix_cache"]["host_bytes_by_model"]
        assert host["llama"] > 0 and host["mistral"] > 0
        await es.reset_prefix_cache()
        assert es.stats()["prefix_cache"]["host_bytes_by_model"] == {}
        assert es.host is not None and es.host.used == 0     # only pages went there
        pool.check_integrity()


async def test_moe_substitution_publishes_nothing_and_exact_runs_share(store):
    from experts.test_offload import offloaded

    prompt = tokens(6 * P + 3, 11)
    async with server(store) as es:
        await es.load("mixtral")
        await offloaded(es, 0.25, "importance+substitution", threshold=1.01)
        a = await es.complete("mixtral", prompt, max_tokens=4, temperature=0)
        b = await es.complete("mixtral", prompt, max_tokens=4, temperature=0)
        assert es.models["mixtral"].substitutions > 0
        assert b.usage.cached_tokens == 0 and a.usage.cached_tokens == 0
        assert not [u for u in kv_units(es.pools["cpu"]) if u.key is not None]
    async with server(store) as es:
        await es.load("mixtral")
        await offloaded(es, 0.5, "lru")         # misses fetched: exact, so pages are shared
        await es.complete("mixtral", prompt, max_tokens=4, temperature=0)
        again = await es.complete("mixtral", prompt, max_tokens=4, temperature=0)
        assert again.usage.cached_tokens == 6 * P
        es.pools["cpu"].check_integrity()


async def test_prefix_cache_off_keeps_nothing(store):
    async with server(store, reuse=False) as es:
        await conversation(es, "llama", turns=2, temperature=0)
        assert es.pools["cpu"].bytes_by_kind()["kv"] == 0
        assert es.stats()["prefix_cache"]["enabled"] is False


def test_the_setting_from_flag_and_environment(monkeypatch, tmp_path):
    from edgeserve.cli import build_parser, edge_server
    from edgeserve.config import from_env

    assert from_env().engine.prefix_cache is True
    monkeypatch.setenv("EDGESERVE_PREFIX_CACHE", "off")
    cfg = from_env()
    assert cfg.engine.prefix_cache is False
    args = build_parser(cfg).parse_args(["serve", "--models", str(tmp_path)])
    assert args.prefix_cache == "off"
    args = build_parser(cfg).parse_args(["serve", "--models", str(tmp_path),
                                         "--prefix-cache", "on"])
    assert edge_server(args).config.engine.prefix_cache is True
    monkeypatch.setenv("EDGESERVE_PREFIX_CACHE", "maybe")
    with pytest.raises(ValueError, match="EDGESERVE_PREFIX_CACHE"):
        from_env()


def preempt_after(engine, sampled: int) -> list[int]:
    """Preempt the running sequence once, right after the step that samples its Nth token,
    on the step thread, as memory pressure would (not from the loop, which may lag behind)."""
    step, done = engine.step, []

    def stepping() -> None:
        step()
        running = [s for s in engine._running if s.sampled >= sampled]
        if running and not done:
            done.append(running[0].sampled)
            engine._preempt(running[0])
    engine.step = stepping
    return done


async def test_a_preempted_sequence_finds_its_own_pages(store):
    prompt = tokens(60, 31)
    outs, extra = {}, {}
    for reuse in (False, True):
        async with server(store, reuse=reuse) as es:
            await es.load("llama")
            engine = es.engine
            assert engine is not None
            before = engine.tokens_computed
            stream = es.stream_complete("llama", prompt, max_tokens=60, temperature=0,
                                        ignore_eos=True)
            preempted = preempt_after(engine, 12)
            got: list[int] = []
            async for delta in stream:
                got.extend(delta.token_ids)
            assert preempted == [12]
            outs[reuse] = got
            # Tokens computed beyond the prompt and the 59 replies fed back.
            extra[reuse] = engine.tokens_computed - before - (60 + 59)
            es.pools["cpu"].check_integrity()
    assert outs[True] == outs[False] and len(outs[True]) == 60
    # Without reuse the whole prompt and the replies so far are computed again; with it,
    # only the partly filled last page.
    assert extra[False] >= 60 + 11
    assert 0 <= extra[True] < P
