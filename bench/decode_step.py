"""One decode step's forward with the CPU's fused decode step (kernels/cpu/decode.py) and
without it (the torch path, the matmul kernels still on), taking turns.

A model is loaded into a CPU pool; N sequences of CTX cached tokens each take one step
(B = N rows) through the model's forward, over float32 weights or every linear of the
layers quantized to int8 / int4 (format 2; the embedding and the head stay float32). Each
variant runs `--steps` steps per repetition, the two alternate for
`--reps` repetitions, and the median per-step time is reported: wall clock, or with
`--clock cpu` the calling thread's CPU time (with `--threads 1`: the whole step, and
robust to other processes on a shared machine).

    .venv/bin/python bench/decode_step.py --model DIR [--rows 1,8,32] [--ctx 64,512]
        [--schemes fp32,int8,int4] [--threads 2] [--clock wall|cpu] [--steps 10] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from edgeserve.arch import build_model
from edgeserve.batch import build_batch
from edgeserve.checkpoint import HashCache
from edgeserve.loader import LoadContext, weight_views
from edgeserve.model import ResidentModel
from edgeserve.pool import BlockPool
from edgeserve.quant.format import quantize
from edgeserve.quant.linear import QWeight


def runners(model: ResidentModel, scheme: str) -> tuple[Any, Any]:
    """The model's forward with decode.c (fused) and without it (plain)."""
    w: dict[str, Any] = weight_views(model.pool, model.units, model.spec, torch.float32)
    if scheme != "fp32":
        w = {k: QWeight.of(scheme, quantize(scheme, v)) if k.endswith("proj.weight") else v
             for k, v in w.items()}
    fused, plain = build_model(model.spec, w), build_model(model.spec, w)
    off: Any = plain
    off.fused.run = lambda *a: False
    off.fused.logits = lambda *a: None
    return fused, plain


def per_step(runner: Any, batch: Any, kv: torch.Tensor, steps: int, cpu: bool) -> float:
    clock = time.thread_time if cpu else time.perf_counter
    start = clock()
    for _ in range(steps):
        runner.forward(batch, kv)
    return (clock() - start) / steps * 1000


def measure(model: ResidentModel, scheme: str, rows: int, ctx: int,
            args: argparse.Namespace) -> dict[str, object]:
    fused, plain = runners(model, scheme)
    pages: list[list[Any]] = [[] for _ in range(rows)]
    for p in pages:
        model.kv.grow(p, ctx)
    batch = build_batch([([5], ctx - 1, p) for p in pages], model.kv.layout.page_tokens,
                        torch.device("cpu"))
    times: dict[str, list[float]] = {"fused": [], "torch": []}
    for runner in (fused, plain):
        per_step(runner, batch, model.kv.view, 2, args.clock == "cpu")       # warm-up
    for _ in range(args.reps):
        for name, runner in (("fused", fused), ("torch", plain)):
            times[name].append(per_step(runner, batch, model.kv.view, args.steps,
                                        args.clock == "cpu"))
    for p in pages:
        model.kv.release(p)
    f, t = statistics.median(times["fused"]), statistics.median(times["torch"])
    return {"bench": "decode-step", "scheme": scheme, "rows": rows, "ctx": ctx,
            "threads": args.threads, "clock": args.clock, "fused_ms": round(f, 2),
            "torch_ms": round(t, 2), "speedup": round(t / f, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face folder")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--ctx", default="64,512")
    parser.add_argument("--schemes", default="fp32,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = BlockPool("cpu", 3 << 30, 1 << 20)
    path = args.model.resolve()
    model = ResidentModel.load(path.name, path, LoadContext(pool, torch.float32,
                                                            HashCache(path.parent)))
    for scheme in args.schemes.split(","):
        for rows in map(int, args.rows.split(",")):
            for ctx in map(int, args.ctx.split(",")):
                print(json.dumps(measure(model, scheme, rows, ctx, args)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
