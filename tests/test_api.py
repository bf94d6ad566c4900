"""EdgeServer end to end on tiny models: exact outputs, batching, memory, errors."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hf_models import ARCHS, hf_greedy, reference

from edgeserve import EdgeServer, InvalidRequest
from edgeserve.pool import UnitKind
from edgeserve.sampling import SamplingError
from edgeserve.store import UnknownModel


def prompts(vocab: int, lengths=(3, 11, 6, 25)) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def server(store, **kw) -> EdgeServer:
    return EdgeServer(models=store, device="cpu", pool_size=kw.pop("pool_size", "64MiB"),
                      block_size=kw.pop("block_size", "4KiB"), **kw)


@pytest.mark.parametrize("arch", list(ARCHS))
async def test_batched_greedy_equals_transformers(arch, tiny_store):
    async with server(tiny_store) as es:
        batch = prompts(320)
        outs = await asyncio.gather(*[es.complete(arch, p, max_tokens=32, temperature=0,
                                                  ignore_eos=True) for p in batch])
        for p, out in zip(batch, outs, strict=True):
            assert out.token_ids == hf_greedy(tiny_store / arch, p, 32)
            assert out.finish_reason == "length" and out.usage.completion_tokens == 32
        es.pools["cpu"].check_integrity()


async def test_new_request_joins_the_running_batch(tiny_store):
    async with server(tiny_store) as es:
        a, b = prompts(320, (5, 9))
        solo_b = await es.complete("llama", b, max_tokens=8, temperature=0, ignore_eos=True)
        stream = es.stream_complete("llama", a, max_tokens=200, temperature=0, ignore_eos=True)
        await anext(stream)                              # a is running
        rest: list = []

        async def read_a() -> None:
            async for delta in stream:
                rest.append(delta)
        reading = asyncio.create_task(read_a())
        steps_before = es.engine.steps
        joined = await es.complete("llama", b, max_tokens=8, temperature=0, ignore_eos=True)
        steps_for_b = es.engine.steps - steps_before
        a_by_then = len(rest)
        await reading
        assert joined.token_ids == solo_b.token_ids
        # b did not wait for a's 200 tokens: it ended while a ran. (Its step count also
        # counts the steps a takes while the event loop hands b its tokens: 9-23 here.)
        assert a_by_then < 100 and steps_for_b < 100
        assert len(rest) > 150 and rest[-1].finish_reason == "length"


async def test_pool_returns_to_baseline_after_requests_and_cancellations(tiny_store):
    async with server(tiny_store) as es:
        await es.load("qwen3")
        pool = es.pools["cpu"]
        baseline = pool.bytes_by_kind()
        assert baseline["kv"] == 0

        async def cancelled_midway(p):
            async for _ in es.stream_complete("qwen3", p, max_tokens=100, ignore_eos=True):
                break                                    # closing the stream cancels it

        async def killed(p):
            task = asyncio.create_task(es.complete("qwen3", p, max_tokens=100, ignore_eos=True))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        ps = prompts(320, (4, 8, 12, 16, 20, 24))
        await asyncio.gather(es.complete("qwen3", ps[0], max_tokens=10, seed=1),
                             *[cancelled_midway(p) for p in ps[1:3]],
                             *[killed(p) for p in ps[3:]])
        for _ in range(100):                             # cancellation lands at the next step
            if es.engine.num_running == 0 and not any(u.pins for u in pool.units_of(UnitKind.KV)):
                break
            await asyncio.sleep(0.01)
        # Nothing running holds KV; what stays is retained for reuse, and goes on request.
        assert not [u for u in pool.units_of(UnitKind.KV) if u.pins or u.key is None]
        await es.reset_prefix_cache()
        assert pool.bytes_by_kind() == baseline
        pool.check_integrity()


async def test_peak_kv_follows_tokens_held_not_max_length(tiny_store):
    async with server(tiny_store) as es:
        await es.load("llama")
        pool, model = es.pools["cpu"], es.models["llama"]
        pool.reset_peak()
        out = await es.complete("llama", prompts(320, (10,))[0], max_tokens=6, ignore_eos=True)
        held = 10 + len(out.token_ids)
        page = model.kv.layout.page_blocks * pool.block_size
        assert pool.peak_by_kind()["kv"] <= model.kv.layout.pages_for(held) * page
        assert model.kv.layout.pages_for(model.spec.max_positions) * page > 4 * page


async def test_preemption_under_a_small_pool_loses_nothing(tiny_store, caplog):
    # Room for the weights and only a few KV pages: sequences must take turns.
    caplog.set_level("INFO", logger="edgeserve.engine")
    async with server(tiny_store, pool_size="480KiB") as es:
        await es.load("llama")
        free_pages = es.pools["cpu"].free_bytes // es.pools["cpu"].block_size
        assert 4 <= free_pages < 24
        batch = prompts(320, (9, 14, 7, 12, 10, 8))
        outs = await asyncio.gather(*[es.complete("llama", p, max_tokens=24, temperature=0,
                                                  ignore_eos=True) for p in batch])
        for p, out in zip(batch, outs, strict=True):
            solo = await es.complete("llama", p, max_tokens=24, temperature=0, ignore_eos=True)
            assert out.token_ids == solo.token_ids
        es.pools["cpu"].check_integrity()
        assert not [u for u in es.pools["cpu"].units_of(UnitKind.KV) if u.pins]
        await es.reset_prefix_cache()
        assert es.pools["cpu"].bytes_by_kind()["kv"] == 0
        assert "preempting" in caplog.text


async def test_seeded_sampling_is_reproducible_in_any_batch(tiny_store):
    async with server(tiny_store) as es:
        p = prompts(320, (8,))[0]
        solo = await es.complete("mistral", p, max_tokens=16, temperature=0.9, seed=42,
                                 ignore_eos=True)
        others = [es.complete("mistral", q, max_tokens=16, temperature=1.0, ignore_eos=True)
                  for q in prompts(320, (3, 5, 7))]
        crowd = await asyncio.gather(*others, es.complete("mistral", p, max_tokens=16,
                                                          temperature=0.9, seed=42,
                                                          ignore_eos=True))
        assert crowd[-1].token_ids == solo.token_ids
        other_seed = await es.complete("mistral", p, max_tokens=16, temperature=0.9, seed=43,
                                       ignore_eos=True)
        assert other_seed.token_ids != solo.token_ids


async def test_stop_token_ids_and_eos(tiny_store):
    async with server(tiny_store) as es:
        p = prompts(320, (6,))[0]
        free = await es.complete("qwen2", p, max_tokens=12, temperature=0, ignore_eos=True)
        stop_at = free.token_ids[5]
        cut = free.token_ids.index(stop_at)
        out = await es.complete("qwen2", p, max_tokens=12, temperature=0, ignore_eos=True,
                                stop_token_ids=[stop_at])
        assert out.token_ids == free.token_ids[:cut] and out.finish_reason == "stop"
        es.models["qwen2"].eos_token_ids = frozenset({stop_at})
        out = await es.complete("qwen2", p, max_tokens=12, temperature=0)
        assert out.token_ids == free.token_ids[:cut] and out.finish_reason == "stop"


async def test_chat_text_and_stop_strings(demo_store):
    async with EdgeServer(models=demo_store, device="cpu", pool_size="256MiB") as es:
        messages = [{"role": "user", "content": "Write about pools."}]
        full = await es.chat("demo-llama", messages, max_tokens=24, temperature=0,
                             ignore_eos=True)
        tok = es.tokenizer("demo-llama")
        assert tok is not None and full.text == tok.decode(full.token_ids)
        stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
        assert stop.strip()
        cut = await es.chat("demo-llama", messages, max_tokens=24, temperature=0,
                            ignore_eos=True, stop=[stop])
        assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
        streamed = [d async for d in es.stream_chat("demo-llama", messages, max_tokens=24,
                                                    temperature=0, ignore_eos=True)]
        assert "".join(d.text for d in streamed) == full.text


async def test_concurrent_loads_share_one_copy_and_unload_retains(tiny_store):
    async with server(tiny_store) as es:
        reports = await asyncio.gather(*[es.load("qwen2") for _ in range(5)])
        pool = es.pools["cpu"]
        weights = pool.bytes_by_kind()["weight"]
        assert 0 < weights < 2 * reports[0].bytes_total
        assert (await es.load("qwen2")).bytes_from_device == reports[0].bytes_total
        assert es.stats()["devices"]["cpu"]["resident_models"] == {"qwen2": weights}
        await es.unload("qwen2")
        stats = es.stats()["devices"]["cpu"]
        assert stats["resident_models"] == {} and stats["retained_bytes"] == weights
        again = await es.load("qwen2")
        assert again.bytes_from_disk == 0 and again.bytes_from_device == again.bytes_total
        pool.check_integrity()


async def test_bad_input_gives_clear_errors(tiny_store, tmp_path):
    async with server(tiny_store) as es:
        with pytest.raises(UnknownModel):
            await es.complete("nope", [1, 2], max_tokens=2)
        with pytest.raises(UnknownModel):
            await es.load("../store")
        with pytest.raises(InvalidRequest, match="vocabulary"):
            await es.complete("llama", [1, 99999], max_tokens=2)
        with pytest.raises(InvalidRequest, match="empty"):
            await es.complete("llama", [], max_tokens=2)
        with pytest.raises(InvalidRequest, match="fewer than"):
            await es.complete("llama", [1] * 600, max_tokens=2)
        with pytest.raises(SamplingError):
            await es.complete("llama", [1, 2], max_tokens=-1)
        with pytest.raises(InvalidRequest, match="tokenizer"):
            await es.complete("llama", "text needs a tokenizer", max_tokens=2)
        # The engine keeps serving after all that.
        assert (await es.complete("llama", [1, 2], max_tokens=3, ignore_eos=True)).usage


async def test_a_broken_model_does_not_stop_the_others(tiny_store, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store / "llama", store / "good")
    shutil.copytree(tiny_store / "llama", store / "bad")
    data = (store / "bad" / "model.safetensors").read_bytes()
    (store / "bad" / "model.safetensors").write_bytes(data[: len(data) // 3])
    async with server(store) as es:
        running = asyncio.create_task(es.complete("good", [1, 2, 3], max_tokens=40,
                                                  ignore_eos=True))
        with pytest.raises(ValueError, match="bad"):
            await es.load("bad")
        assert (await running).usage.completion_tokens == 40
        es.pools["cpu"].check_integrity()


async def test_logprobs_match_transformers(tiny_store):
    async with server(tiny_store) as es:
        p = prompts(320, (7,))[0]
        out = await es.complete("qwen3", p, max_tokens=6, temperature=0, ignore_eos=True,
                                logprobs=3)
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
        with torch.no_grad():
            ids = torch.tensor([p + out.token_ids])
            logp = reference(tiny_store / "qwen3")(ids).logits[0].log_softmax(-1)
        for i, lp in enumerate(out.logprobs):
            expected = logp[len(p) - 1 + i]
            assert lp.token_id == out.token_ids[i]
            assert abs(lp.logprob - float(expected[lp.token_id])) < 1e-4
            assert [t for t, _ in lp.top] == expected.topk(3).indices.tolist()
            assert lp.top[0][0] == lp.token_id            # greedy picks the most likely
        plain = await es.complete("qwen3", p, max_tokens=6, temperature=0, ignore_eos=True)
        assert plain.logprobs is None and plain.token_ids == out.token_ids


def rss() -> int:
    import mmap
    from pathlib import Path

    return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="Linux only")
async def test_a_closed_server_gives_its_memory_back_while_still_referenced(tiny_store):
    """An application (aiohttp's handler cache, for one) may keep a closed server alive; the
    pool's slab, faulted in when the pool is made, must not stay with it."""
    from test_hugepages import resident_bytes

    es = server(tiny_store, pool_size="256MiB")
    async with es:
        await es.load("llama")
        assert await asyncio.to_thread(es.pools["cpu"].prefault.caught_up.wait, 60)
        slab = es.pools["cpu"].slab
        assert slab is not None and resident_bytes(slab) > 200 << 20   # faulted in
        del slab
        held = rss()     # (the process's own size: other tests' memory may come and go)
    assert es.pools["cpu"].slab is None and es.host is not None and es.host.used == 0
    assert held - rss() > 150 << 20


async def test_a_closed_server_starts_again(tiny_store):
    es = server(tiny_store)
    outs = []
    for _ in range(2):
        async with es:
            out = await es.complete("llama", [5, 6, 7], max_tokens=6, temperature=0,
                                    ignore_eos=True)
            outs.append(out.token_ids)
            assert es.pools["cpu"].slab is not None and es.stats()["loads"]["loads"] == 1
        assert es.pools["cpu"].slab is None
    assert outs[0] == outs[1]
