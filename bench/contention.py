"""Compute threads under contention: `--cpu-threads auto` against a fixed full count.

One fixed request mix (waves of streamed completions with prompts of 16-128 tokens, on
bench/decode.py's small Llama), run on a quiet machine and beside a CPU hog (one busy
process holding a core), with the step thread's threads adapted (auto) and fixed at torch's
count. Rounds alternate the four conditions, each on a fresh server (so auto starts at the
full count and pays for noticing the hog). Prints one JSON line: p50/p95 TTFT and tok/s per
condition (medians over rounds), auto/fixed ratios with and without the hog, the count auto
ended at and how often it changed, the cores other processes kept busy during each
condition (the hog included), the run-queue wait share per wave at the fixed count (the
signal auto reads), and the load average before and after. Last, auto on one server while
a hog comes and goes: the thread count over time (it should fall and rise again) and tok/s
with and after the hog.

    .venv/bin/python bench/contention.py [--waves 3] [--rounds 2] [--tokens 24]
                                         [--hog-leaves 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from decode import SIZES, make_model, prompt_ids

from edgeserve import EdgeServer
from edgeserve.engine import cpu_signals

PROMPTS = (16, 48, 96, 16, 128, 32)          # one wave: prompt lengths, in arrival order
GAP = 0.03                                   # seconds between arrivals in a wave


async def one(es: EdgeServer, prompt: list[int], tokens: int, delay: float
              ) -> tuple[float, int]:
    """(TTFT seconds, completion tokens) of one streamed request after `delay`."""
    await asyncio.sleep(delay)
    start, first, count = time.perf_counter(), None, 0
    async for delta in es.stream_complete("model", prompt, max_tokens=tokens, temperature=0,
                                          ignore_eos=True):
        if first is None and delta.token_ids:
            first = time.perf_counter() - start
        count += len(delta.token_ids)
    assert first is not None and count == tokens
    return first, count


async def condition(store: Any, threads: str, tokens: int, waves: int, vocab: int
                    ) -> dict[str, Any]:
    ttfts: list[float] = []
    produced, busy = 0, 0.0
    async with EdgeServer(models=store, device="cpu", pool_size="1GiB",
                          cpu_threads=threads, prewarm=False) as es:
        await es.load("model")
        await es.complete("model", [1, 2, 3], max_tokens=2)      # warm-up
        shares = []
        for w in range(waves):
            start, before = time.perf_counter(), cpu_signals.read()
            done = await asyncio.gather(*[
                one(es, prompt_ids(n, vocab, 100 * w + i), tokens, i * GAP)
                for i, n in enumerate(PROMPTS)])
            busy += time.perf_counter() - start
            after = cpu_signals.read()
            if before and after and threads != "auto":     # the signal at a fixed count
                shares.append(cpu_signals.between(before, after).wait_share(int(threads)))
            ttfts += [t for t, _ in done]
            produced += sum(c for _, c in done)
        stats = es.stats()["cpu_threads"]
    ttfts.sort()
    return {"p50": statistics.median(ttfts), "p95": ttfts[int(0.95 * (len(ttfts) - 1))],
            "tok_s": produced / busy, "threads": stats["threads"],
            "changes": stats["changes"], "wait_shares": shares}


async def hog_leaves(store: Any, vocab: int, seconds: float) -> dict[str, Any]:
    """auto on one server: a hog for `seconds` of steady work, then none for as long. When
    the count fell and rose again (seconds after the hog started), and tok/s in each half."""
    async with EdgeServer(models=store, device="cpu", pool_size="1GiB", prewarm=False) as es:
        await es.load("model")
        await es.complete("model", [1, 2, 3], max_tokens=2)
        engine = es.engine
        assert engine is not None
        seen: list[tuple[float, int, float | None]] = []
        rates: dict[bool, list[float]] = {True: [], False: []}
        busy: subprocess.Popen[bytes] | None = hog()
        start = time.monotonic()
        while (now := time.monotonic() - start) < 2 * seconds:
            if busy is not None and now >= seconds:
                busy.kill()
                busy.wait()
                busy = None
            began, before = time.perf_counter(), cpu_signals.read()
            await asyncio.gather(*[es.complete("model", prompt_ids(32, vocab, s), max_tokens=32,
                                               ignore_eos=True) for s in range(4)])
            rates[busy is not None].append(128 / (time.perf_counter() - began))
            threads, after = es.stats()["cpu_threads"]["threads"], cpu_signals.read()
            if not seen or seen[-1][1] != threads:      # when, the count, others' cores
                others = cpu_signals.between(before, after).others if before and after else None
                seen.append((round(time.monotonic() - start, 2), threads,
                             None if others is None else round(others, 2)))
        if busy is not None:
            busy.kill()
            busy.wait()
    return {"hog_leaves_counts": seen, "hog_leaves_hog_seconds": seconds,
            "hog_leaves_tok_s_with": round(statistics.median(rates[True]), 1),
            "hog_leaves_tok_s_after": round(statistics.median(rates[False]), 1)}


def hog() -> subprocess.Popen[bytes]:
    """One process that keeps a core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    path = make_model("small")
    store = path.parent
    if not (store / "model").exists():
        (store / "model").symlink_to(path.name)
    vocab = int(SIZES["small"]["vocab_size"])
    full = str(torch.get_num_threads())
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for hogged in (False, True):
            for threads in ("auto", full):
                busy = hog() if hogged else None
                try:
                    if busy:
                        time.sleep(0.3)
                    before = cpu_signals.read()
                    result = await condition(store, threads, args.tokens, args.waves, vocab)
                    after = cpu_signals.read()
                finally:
                    if busy:
                        busy.kill()
                        busy.wait()
                if before and after:    # cores other processes (the hog too) kept busy
                    result["others"] = cpu_signals.between(before, after).others
                key = f"{'hog' if hogged else 'quiet'}_{'auto' if threads == 'auto' else 'fixed'}"
                runs.setdefault(key, []).append(result)
    out: dict[str, Any] = {"bench": "contention", "threads_full": int(full),
                           "waves": args.waves, "rounds": args.rounds, "tokens": args.tokens,
                           "load_before": round(load_before, 2)}
    for key, results in runs.items():
        for figure in ("p50", "p95", "tok_s"):
            value = statistics.median(r[figure] for r in results)
            out[f"{key}_{figure}{'_ms' if figure != 'tok_s' else ''}"] = round(
                value * 1000 if figure != "tok_s" else value, 1)
        others = [r["others"] for r in results if r.get("others") is not None]
        out[f"{key}_other_cores"] = [round(o, 2) for o in others]
        if key.endswith("fixed"):       # run-queue wait per thread, as a share of a wave
            out[f"{key}_wait_shares"] = [round(x, 3) for r in results for x in r["wait_shares"]]
        if key.endswith("auto"):
            out[f"{key}_threads_at_end"] = [r["threads"] for r in results]
            out[f"{key}_changes"] = [r["changes"] for r in results]
    for where in ("quiet", "hog"):
        out[f"{where}_p95_auto_vs_fixed"] = round(
            out[f"{where}_auto_p95_ms"] / out[f"{where}_fixed_p95_ms"], 3)
        out[f"{where}_tok_s_auto_vs_fixed"] = round(
            out[f"{where}_auto_tok_s"] / out[f"{where}_fixed_tok_s"], 3)
    if args.hog_leaves:
        out |= await hog_leaves(store, vocab, args.hog_leaves)
    out["load_after"] = round(os.getloadavg()[0], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--hog-leaves", type=float, default=5.0, metavar="SECONDS",
                        help="then auto with a hog for this long and none after (0: skip)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
