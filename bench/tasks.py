"""Task switching with task packs: aligned, unaligned, and a full reload of each fine-tune.

A Llama base of about 310 MB in fp32 (random weights, made locally) and 8 fine-tunes of it,
each the base plus: a change common to every task on 5% of the linear weights' blocks (the
same values for all: tasks tuned from one intermediate), the task's own change on 15% of
the blocks at random, and small dense noise. They are packed twice with a budget of 10% of
the blocks: aligned (tasks share consensus blocks) and unaligned (each its own top blocks).

Switching A -> B around the cycle of the 8 tasks, with the base and A loaded: every unpinned
task block is dropped from the pool and the packs from the page cache, then B's load is
timed and A unloaded; the bytes moved are LoadReport.bytes_from_disk (bytes read from the
device, per /proc/self/io, beside them). The baseline loads each fine-tuned checkpoint
whole with the Ollama-like policy (nothing retained, nothing shared), page cache dropped.
Then tasks batched with their base against tasks taking turns (EngineConfig.batch_tasks):
8 greedy streams over 4 tasks, aggregate tokens/s (median of --repeats runs each, after one
dropped pair) and whether the outputs agree.
Prints one JSON line (a table to stderr). Models and packs are cached in bench/out.

    .venv/bin/python bench/tasks.py [--small] [--repeats 2] [--repack] [--skip-batching]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from load import drop_cache  # bench/load.py: a folder's safetensors out of the page cache
from safetensors.torch import load_file, save_file

from edgeserve import EdgeServer
from edgeserve.blocks.build import pack_tasks
from edgeserve.blocks.pack import TASK_FILE, TaskPack
from edgeserve.config import Config, EngineConfig, PoolConfig, TierConfig

OUT = Path(__file__).parent / "out" / "tasks-store"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TASKS, BUDGET = 8, 0.1
COMMON, OWN, SCALE, NOISE = 0.05, 0.15, 0.02, 1e-4    # shares of blocks; change std; noise std
FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
            num_attention_heads=16, num_key_value_heads=4, vocab_size=16000)
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,   # vocab: 16 | it
             num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
MiB = 1 << 20


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def make_base(store: Path, small: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = store / "base"
    if not weights(path).is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**(SMALL if small else FULL))).save_pretrained(path)
    if not small and weights(path).stat().st_size < 300e6:
        raise SystemExit(f"{weights(path)} is under 300 MB: make the base larger")
    return path


def block_mask(shape: torch.Size, block: int, share: float, gen: torch.Generator
               ) -> torch.Tensor:
    mask = torch.rand(shape[0] // block, shape[1] // block, generator=gen) < share
    return mask.repeat_interleave(block, 0).repeat_interleave(block, 1)


def make_finetunes(base: Path, block: int) -> list[Path]:
    """ft-0..7: base + the common change + each task's own change + dense noise."""
    dirs = [base.parent / f"ft-{t}" for t in range(TASKS)]
    todo = [d for d in dirs if not weights(d).is_file()]
    if not todo:
        return dirs
    tensors = load_file(str(weights(base)))
    linear = [n for n, w in tensors.items() if w.dim() == 2 and any(f".{x}." in n for x in LINEARS)]
    gen = torch.Generator().manual_seed(1000)
    common = {n: torch.randn(tensors[n].shape, generator=gen) * SCALE
              * block_mask(tensors[n].shape, block, COMMON, gen) for n in linear}
    for folder in todo:
        print(f"making {folder.name}", file=sys.stderr)
        gen = torch.Generator().manual_seed(int(folder.name.split("-")[1]))
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        out = dict(tensors)
        for n in linear:
            w = tensors[n]
            own = torch.randn(w.shape, generator=gen) * SCALE * block_mask(w.shape, block, OWN, gen)
            out[n] = w + common[n] + own + torch.randn(w.shape, generator=gen) * NOISE
        save_file({k: v.contiguous() for k, v in out.items()}, str(weights(folder)),
                  metadata={"format": "pt"})
    return dirs


def make_packs(base: Path, finetunes: list[Path], block: int, aligned: bool, prefix: str,
               repack: bool) -> tuple[list[str], list[dict[str, float]]]:
    """Pack (unless cached); per pack its id, blocks (own and shared) and change error."""
    names = [f"{prefix}-{t}" for t in range(TASKS)]
    store = base.parent
    if repack or not all((store / n / TASK_FILE).is_file() for n in names):
        pack_tasks(base, finetunes, store, block=(block, block), budget=BUDGET, aligned=aligned,
                   names=names)
    rows = []
    for name in names:
        pack = TaskPack.read(store / name)
        rows.append({"blocks": pack.num_blocks, "change_error": pack.error["change_error"]})
        print(f"{name}: {pack.num_blocks} blocks ({len(pack.keys)} distinct), change_error "
              f"{pack.error['change_error']:.4f}", file=sys.stderr)
    return names, rows


def read_bytes() -> int:
    """Bytes this process has had read from the storage device (0 where not reported)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines()
                 if line.startswith("read_bytes:")), 0)


def drop_task_blocks(es: EdgeServer) -> int:
    """Evict every task block no loaded task uses (engine thread); returns chunks evicted."""
    return sum(arena.drop_unused() for arena in es.scheduler.tasks.arenas.values())


Samples = dict[str, list[float]]


def config(store: Path, pool_size: int, policy: str = "edgeserve", batch_tasks: bool = True
           ) -> Config:
    return Config(models=store, device="cpu", pool=PoolConfig(pool_size=pool_size),
                  engine=EngineConfig(batch_tasks=batch_tasks), tiers=TierConfig(policy=policy))


async def timed_load(es: EdgeServer, model: str, out: Samples) -> None:
    """Load model, adding its seconds, bytes moved and bytes read from the device to out."""
    io, start = read_bytes(), time.perf_counter()
    report = await es.load(model)
    out["seconds"].append(time.perf_counter() - start)
    out["read_bytes"].append(read_bytes() - io)
    out["bytes"].append(report.bytes_from_disk)


async def switching(store: Path, ids: list[str], pool_size: int, repeats: int) -> Samples:
    """Task switches around the cycle of ids, the base resident throughout."""
    packs = [store / i for i in ids]
    out: Samples = {"seconds": [], "bytes": [], "read_bytes": []}
    async with EdgeServer(config=config(store, pool_size)) as es:
        engine = es.engine
        assert engine is not None
        await es.load("base")
        await es.load(ids[0])
        for _ in range(repeats):
            for a, b in zip(ids, ids[1:] + ids[:1], strict=True):
                await engine.run(drop_task_blocks, es)
                for folder in packs:
                    drop_cache(folder)
                await timed_load(es, b, out)
                await es.unload(a)
                served = await es.complete(b, [1, 2, 3], max_tokens=4, temperature=0,
                                           ignore_eos=True)
                assert len(served.token_ids) == 4, served
    return out


async def reloading(store: Path, ids: list[str], pool_size: int, repeats: int) -> Samples:
    """Each fine-tune loaded whole, nothing retained between loads."""
    out: Samples = {"seconds": [], "bytes": [], "read_bytes": []}
    async with EdgeServer(config=config(store, pool_size, policy="ollama")) as es:
        for i in ids:                       # hashes the files once (cached in the store)
            await es.load(i)
            await es.unload(i)
        for _ in range(repeats):
            for i in ids[1:] + ids[:1]:
                drop_cache(store / i)
                await timed_load(es, i, out)
                await es.unload(i)
    return out


async def batching(store: Path, pool_size: int, vocab: int, batch_tasks: bool
                   ) -> tuple[float, list[list[int]]]:
    """8 greedy streams, 2 on each of task-0..3: aggregate completion tokens/s and outputs."""
    tasks = [f"task-{i // 2}" for i in range(8)]
    prompts = [torch.randint(1, vocab, (16,), generator=torch.Generator().manual_seed(s)).tolist()
               for s in range(8)]
    async with EdgeServer(config=config(store, pool_size, batch_tasks=batch_tasks)) as es:
        for model in ["base", *dict.fromkeys(tasks)]:
            await es.load(model)

        async def run(tokens: int) -> list[list[int]]:
            outs = await asyncio.gather(*[
                es.complete(t, p, max_tokens=tokens, temperature=0, ignore_eos=True)
                for t, p in zip(tasks, prompts, strict=True)])
            return [o.token_ids for o in outs]

        await run(4)                         # warm-up
        start = time.perf_counter()
        outs = await run(32)
        seconds = time.perf_counter() - start
    return sum(map(len, outs)) / seconds, outs


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny model: a quick check")
    parser.add_argument("--repeats", type=int, default=2, help="cycles over the 8 tasks")
    parser.add_argument("--repack", action="store_true", help="pack again even if cached")
    parser.add_argument("--skip-batching", action="store_true")
    args = parser.parse_args()
    store, block = (OUT / "small", 16) if args.small else (OUT / "full", 64)
    base = make_base(store, args.small)
    base_bytes = weights(base).stat().st_size
    finetunes = make_finetunes(base, block)
    aligned, a_rows = make_packs(base, finetunes, block, True, "task", args.repack)
    free, u_rows = make_packs(base, finetunes, block, False, "free", args.repack)
    task_bytes = int(max(r["blocks"] for r in a_rows + u_rows)) * block * block * 4
    pool_size = base_bytes + 6 * task_bytes + 64 * MiB
    med: dict[str, dict[str, float]] = {}
    for case, ids in (("aligned", aligned), ("unaligned", free),
                      ("reload", [f.name for f in finetunes])):
        measure = reloading if case == "reload" else switching
        samples = asyncio.run(measure(store, ids, pool_size, args.repeats))
        med[case] = {k: statistics.median(v) for k, v in samples.items()}
    a, u, r = med["aligned"], med["unaligned"], med["reload"]
    result: dict[str, object] = {
        "bench": "tasks", "small": args.small, "base_bytes": base_bytes, "budget": BUDGET,
        "block": [block, block], "tasks": TASKS, "repeats": args.repeats,
        "change_error": {"aligned": round(statistics.mean(x["change_error"] for x in a_rows), 4),
                         "unaligned": round(statistics.mean(x["change_error"] for x in u_rows),
                                            4)},
        **{case: {"seconds": round(m["seconds"], 4), "bytes": int(m["bytes"]),
                  "read_bytes": int(m["read_bytes"])} for case, m in med.items()},
        "reload_vs_aligned_seconds": ratio(r["seconds"], a["seconds"]),
        "reload_vs_aligned_bytes": ratio(r["bytes"], a["bytes"]),
        "unaligned_vs_aligned_bytes": ratio(u["bytes"], a["bytes"]),
        "unaligned_vs_aligned_seconds": ratio(u["seconds"], a["seconds"])}
    print(f"{'':10} {'switch s':>9} {'MB moved':>9} {'MB read':>9}", file=sys.stderr)
    for case, m in med.items():
        print(f"{case:10} {m['seconds']:9.4f} {m['bytes'] / 1e6:9.2f} {m['read_bytes'] / 1e6:9.2f}",
              file=sys.stderr)
    if not args.skip_batching:
        vocab = (SMALL if args.small else FULL)["vocab_size"]
        # The process's first server runs slower (first-use costs): one pair is run and
        # dropped, then pairs in alternating order; medians.
        asyncio.run(batching(store, pool_size, vocab, True))
        asyncio.run(batching(store, pool_size, vocab, False))
        rates: dict[bool, list[float]] = {True: [], False: []}
        outputs: dict[bool, list[list[int]]] = {}
        for i in range(args.repeats):
            for mode in ((True, False) if i % 2 == 0 else (False, True)):
                rate, outputs[mode] = asyncio.run(batching(store, pool_size, vocab, mode))
                rates[mode].append(rate)
        batched, turns = statistics.median(rates[True]), statistics.median(rates[False])
        out_b, out_t = outputs[True], outputs[False]
        result |= {"batched_tok_s": round(batched, 1), "interleaved_tok_s": round(turns, 1),
                   "batched_vs_interleaved": ratio(batched, turns),
                   "outputs_identical": out_b == out_t}
        print(f"batched {batched:.1f} tok/s, taking turns {turns:.1f} tok/s, outputs "
              f"{'identical' if out_b == out_t else 'DIFFER'}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
