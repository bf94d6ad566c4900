"""Prefix KV reuse: the same workloads with the prefix cache on and off, in one run.

Model: a Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
intermediate 1536, vocabulary 49152; random weights, made locally by transformers). Prompts
are token ids: a chat client's template turns each turn into the previous prompt, the reply
and the new message, which is what the token lists here are.

  (a) an 8-turn chat over an ~800-token system prompt, replies fed back: TTFT per turn;
  (b) 16 clients sharing a 1,000-token system prompt, each with its own 20-token question,
      all arriving together: p50/p95 TTFT and the peak KV bytes;
  (c) a 1,000-token prefix demoted to the host tier: TTFT when it is restored, against
      recomputing it (reuse off) and finding it on the device.

Rounds alternate off and on; each round starts with an empty prefix cache. Prints one JSON
line with medians over rounds and the ratios (on / off).

    .venv/bin/python bench/prefix.py [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from edgeserve import EdgeServer

OUT = Path(__file__).parent / "out"
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
             tie_word_embeddings=True, max_position_embeddings=8192)


def make_model() -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = OUT / "prefix-store" / "llama-135m"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(path)
    return path.parent


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, SHAPE["vocab_size"], (n,), generator=g).tolist()


async def ttft(es: EdgeServer, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Seconds to the first token, and the whole reply."""
    start, first, out = time.perf_counter(), None, []
    async for delta in es.stream_complete("llama-135m", prompt, max_tokens=max_tokens,
                                          temperature=0, ignore_eos=True):
        if first is None and delta.token_ids:
            first = time.perf_counter() - start
        out.extend(delta.token_ids)
    assert first is not None
    return first, out


async def chat(es: EdgeServer, turns: int, seed: int) -> list[float]:
    prompt, times = ids(800, seed), []
    for turn in range(turns):
        seconds, reply = await ttft(es, prompt, 24)
        times.append(seconds)
        prompt = prompt + reply + ids(40, seed + 100 + turn)
    return times


async def burst(es: EdgeServer, clients: int, seed: int) -> tuple[list[float], int]:
    system = ids(1000, seed)
    pool = es.pools[next(iter(es.pools))]
    pool.reset_peak()
    results = await asyncio.gather(*[ttft(es, system + ids(20, seed + 1 + c), 16)
                                     for c in range(clients)])
    return [t for t, _ in results], pool.peak_by_kind()["kv"]


async def restore(on: EdgeServer, off: EdgeServer, seed: int) -> dict[str, float]:
    prompt = ids(1001, seed)
    recompute, expected = await ttft(off, prompt, 4)
    await ttft(on, prompt, 4)
    device_hit, _ = await ttft(on, prompt, 4)
    pool = on.pools[next(iter(on.pools))]
    await on.engine.run(pool.evict)                  # every retained page to the host tier
    assert on.scheduler.kv_host.owners, "the pages were not demoted"
    restored, got = await ttft(on, prompt, 4)
    assert got == expected, "a restored prefix must give the same output"
    return {"recompute_s": recompute, "device_hit_s": device_hit, "host_restore_s": restored}


def median(rows: list[float]) -> float:
    return statistics.median(rows)


def p95(rows: list[float]) -> float:
    return sorted(rows)[max(0, round(0.95 * len(rows)) - 1)]


async def main(args: argparse.Namespace) -> dict[str, object]:
    store = make_model()
    servers = {reuse: EdgeServer(models=store, device=args.device, host_size="4GiB",
                                 prefix_cache=reuse) for reuse in (False, True)}
    for es in servers.values():
        await es.start()
        await es.load("llama-135m")
    chats: dict[bool, list[list[float]]] = {False: [], True: []}
    bursts: dict[bool, list[tuple[list[float], int]]] = {False: [], True: []}
    restores: list[dict[str, float]] = []
    try:
        for r in range(args.rounds):
            for reuse in (False, True):
                es = servers[reuse]
                await es.reset_prefix_cache()
                chats[reuse].append(await chat(es, args.turns, seed=10 * r))
                await es.reset_prefix_cache()
                bursts[reuse].append(await burst(es, args.clients, seed=1000 + r))
            await servers[True].reset_prefix_cache()
            restores.append(await restore(servers[True], servers[False], seed=5000 + r))
    finally:
        for es in servers.values():
            await es.close()
    per_turn = {reuse: [median([c[t] for c in chats[reuse]]) for t in range(args.turns)]
                for reuse in (False, True)}
    later = {reuse: median([c[t] for c in chats[reuse] for t in range(1, args.turns)])
             for reuse in (False, True)}
    burst_all = {reuse: [t for times, _ in bursts[reuse] for t in times]
                 for reuse in (False, True)}
    peak = {reuse: median([kv for _, kv in bursts[reuse]]) for reuse in (False, True)}
    restore_med = {k: median([r[k] for r in restores]) for k in restores[0]}
    return {
        "bench": "prefix", "device": args.device, "rounds": args.rounds,
        "a_ttft_per_turn_off_s": [round(x, 4) for x in per_turn[False]],
        "a_ttft_per_turn_on_s": [round(x, 4) for x in per_turn[True]],
        "a_turns_2_8_median_ratio": round(later[True] / later[False], 3),
        "b_p50_ttft_off_s": round(median(burst_all[False]), 4),
        "b_p50_ttft_on_s": round(median(burst_all[True]), 4),
        "b_p95_ttft_off_s": round(p95(burst_all[False]), 4),
        "b_p95_ttft_on_s": round(p95(burst_all[True]), 4),
        "b_p95_ratio": round(p95(burst_all[True]) / p95(burst_all[False]), 3),
        "b_peak_kv_off_bytes": int(peak[False]), "b_peak_kv_on_bytes": int(peak[True]),
        "b_peak_kv_ratio": round(peak[True] / peak[False], 3),
        "c_ttft_s": {k: round(v, 4) for k, v in restore_med.items()},
        "c_restore_vs_recompute": round(restore_med["host_restore_s"]
                                        / restore_med["recompute_s"], 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
