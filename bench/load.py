"""Model loading: transformers against edgeserve cold, from the host tier, and retained.

On one model of about 500 MB (fp32 Llama, random weights, made locally), measures:
the machine's disk-read ceiling (the same files read with plain sequential reads);
transformers `from_pretrained` plus the move to the device; edgeserve cold from disk;
edgeserve from the host tier; edgeserve retained in the pool; and a first sight: a
never-seen copy of the model in a fresh store and a fresh server (its tensors hashed by the
reader threads as they load it) against the same load with the hashes cached, and against
hashing the file first (blake2b, the way before). Before every disk measurement the files
are dropped from the page cache (posix_fadvise DONTNEED), so disk means disk; every timed
load starts once the pool's memory is faulted in, as in a server up for a few seconds
(edgeserve.pool.hugepages.Prefault). Prints one JSON line of seconds, GB/s and the target
ratios (first sight: at most 1.2x the cached load).

    .venv/bin/python bench/load.py [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path

import torch
from tracelog import faulted

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig

OUT = Path(__file__).parent / "out" / "load-store"
MODEL = "llama-500m"
SIZE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, vocab_size=32000)


def make_model() -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = OUT / MODEL
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SIZE)).save_pretrained(path)
    return path


def files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def drop_cache(path: Path) -> None:
    for f in files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ceiling(path: Path) -> float:
    """Seconds to read the files sequentially in 32 MiB reads, nothing else."""
    drop_cache(path)
    buf = bytearray(32 << 20)
    start = time.perf_counter()
    for f in files(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def hf_load(path: str, device: str) -> float:
    """transformers from_pretrained + move to the device, in a fresh process."""
    from transformers import AutoModelForCausalLM

    drop_cache(Path(path))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def in_fresh_process(fn: Callable[..., float], *args: object) -> float:
    with get_context("spawn").Pool(1) as pool:
        return float(pool.apply(fn, args))


async def edgeserve_loads(path: Path, device: str, repeats: int) -> dict[str, list[float]]:
    nbytes = sum(f.stat().st_size for f in files(path))
    cfg = Config(models=OUT, device=device, dtype="float32",
                 pool=PoolConfig(pool_size=int(nbytes * 1.3)),
                 tiers=TierConfig(host_size=int(nbytes * 1.3)))
    times: dict[str, list[float]] = {"cold": [], "host": [], "retained": []}
    async with EdgeServer(config=cfg) as es:
        await faulted(es)
        await es.load(MODEL)                  # hashes the files once (cached in the store)
        await es.unload(MODEL)
        for _ in range(repeats):
            es.pools[next(iter(es.pools))].evict()   # to the host tier
            es.host._entries.clear()  # type: ignore[union-attr]  # cold: from disk only
            es.host.used = 0  # type: ignore[union-attr]
            drop_cache(path)
            report = await es.load(MODEL)
            assert report.bytes_from_disk == report.bytes_total
            times["cold"].append(report.seconds)
            await es.unload(MODEL)
            es.pools[next(iter(es.pools))].evict()   # demoted to the host tier
            report = await es.load(MODEL)
            assert report.bytes_from_host == report.bytes_total
            times["host"].append(report.seconds)
            await es.unload(MODEL)
            report = await es.load(MODEL)
            assert report.bytes_from_device == report.bytes_total
            times["retained"].append(report.seconds)
            await es.unload(MODEL)
    return times


async def first_sight(path: Path, device: str, repeats: int) -> dict[str, list[float]]:
    """A never-seen copy in a fresh store, then the same load with the hashes cached."""
    from edgeserve.checkpoint import hash_file

    nbytes = sum(f.stat().st_size for f in files(path))
    times: dict[str, list[float]] = {"first": [], "cached": [], "hash_first": []}
    for _ in range(repeats):
        store = OUT.parent / "load-fresh-store"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(path, store / MODEL)          # new files: never seen, never hashed
        cfg = Config(models=store, device=device, dtype="float32",
                     pool=PoolConfig(pool_size=int(nbytes * 1.3)),
                     tiers=TierConfig(host_size=int(nbytes * 1.3)),
                     scheduler=SchedulerConfig(first_sight=True, idle_hashing=False))
        for kind in ("first", "cached"):
            async with EdgeServer(config=cfg) as es:
                await faulted(es)
                drop_cache(store / MODEL)
                report = await es.load(MODEL)
                hashes = es.scheduler.hashes
                assert (hashes.streamed, hashes.computed) == ((1, 1) if kind == "first"
                                                              else (0, 0))
                times[kind].append(report.seconds)
        drop_cache(store / MODEL)                     # the way before: a hashing pass first
        start = time.perf_counter()
        for f in files(store / MODEL):
            hash_file(f, "blake2b")
        times["hash_first"].append(time.perf_counter() - start + times["cached"][-1])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = make_model()
    gb = sum(f.stat().st_size for f in files(path)) / 1e9
    disk = statistics.median(ceiling(path) for _ in range(args.repeats))
    hf = statistics.median(in_fresh_process(hf_load, str(path), args.device)
                           for _ in range(args.repeats))
    ours = asyncio.run(edgeserve_loads(path, args.device, args.repeats))
    ours |= asyncio.run(first_sight(path, args.device, args.repeats))
    med = {k: statistics.median(v) for k, v in ours.items()}

    def entry(seconds: float) -> dict[str, float]:
        return {"seconds": round(seconds, 4), "gb_s": round(gb / seconds, 2)}

    print(json.dumps({
        "bench": "load", "device": args.device, "model_gb": round(gb, 3),
        "disk_ceiling": entry(disk), "transformers": entry(hf),
        "edgeserve_cold": entry(med["cold"]), "edgeserve_host": entry(med["host"]),
        "edgeserve_retained": entry(med["retained"]),
        "first_sight": entry(med["first"]), "cached_hashes": entry(med["cached"]),
        "blake2b_hash_then_load": entry(med["hash_first"]),
        "first_sight_vs_cached": round(med["first"] / med["cached"], 2),
        "hash_first_vs_cached": round(med["hash_first"] / med["cached"], 2),
        "cold_vs_transformers": round(hf / med["cold"], 2),
        "cold_share_of_ceiling": round(disk / med["cold"], 2),
        "retained_vs_cold": round(med["cold"] / med["retained"], 1)}))


if __name__ == "__main__":
    main()
