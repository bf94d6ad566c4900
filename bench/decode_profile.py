"""Where a decode step's time goes, through the real engine (EdgeServer), per component.

N streams of 8-token prompts decode `--tokens` tokens each (greedy, all together); timers
wrapped around the engine's and the model's functions give milliseconds per decode step:
the linears (`matmul`), the rest of attention (rotary embeddings, KV write and gather,
scaled dot-product attention), the norms, the rest of the forward, building the batch,
sampling, taking the tokens (stop checks, detokenization, events) and the step loop
itself; with the CPU time the event loop's thread spends per step (handing tokens to the
request coroutines). Where the CPU's fused decode step (kernels/cpu/decode.py) runs every
layer in one call, its time is `fused_layers`, and the final norm with the head is
`fused_head`. Only the decode steps are counted (the first step, a prefill, is
left out). Each timer costs about a microsecond per call (some 250 calls a step).

    .venv/bin/python bench/decode_profile.py --model DIR [--streams 1,8,32] [--tokens 32]
                                             [--prefix-cache on,off] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import edgeserve.arch.dense as dense
import edgeserve.engine as engine
from edgeserve import EdgeServer
from edgeserve.kernels.cpu.decode import FusedDecode
from edgeserve.model import ResidentModel
from edgeserve.sequence import Sequence

TIMES: dict[str, float] = defaultdict(float)     # component -> seconds of its own
DECODING = [False]          # only decode forwards are counted
STACK: list[list[float]] = []   # per open timer: seconds spent in timed callees


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, its own time (less that of timed callees) added to TIMES[name]."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not DECODING[0]:
            return fn(*args, **kwargs)
        STACK.append([0.0])
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            TIMES[name] += elapsed - STACK.pop()[0]
            if STACK:
                STACK[-1][0] += elapsed
    return wrapper


def instrument() -> None:
    forward = engine.Engine._forward

    step = timed("engine_rest", forward)

    def decode_aware(self: engine.Engine, seqs: list[Sequence], limit: int) -> None:
        DECODING[0] = limit == 1
        try:
            step(self, seqs, limit)
        finally:
            TIMES["steps"] += DECODING[0]
            DECODING[0] = False

    engine.Engine._forward = decode_aware              # type: ignore[method-assign]
    engine.build_batch = timed("build_batch", engine.build_batch)
    engine.sample = timed("sample", engine.sample)
    ResidentModel.forward = timed("forward_rest", ResidentModel.forward)  # type: ignore
    Sequence.accept = timed("accept", Sequence.accept)  # type: ignore[method-assign]
    dense.matmul = timed("matmul", dense.matmul)
    dense.attention = timed("attention_rest", dense.attention)
    dense.gather = timed("kv_gather", dense.gather)
    dense.norm = timed("norm", dense.norm)
    dense.mlp = timed("mlp_rest", dense.mlp)
    FusedDecode.run = timed("fused_layers", FusedDecode.run)  # type: ignore[method-assign]
    FusedDecode.logits = timed("fused_head", FusedDecode.logits)  # type: ignore[method-assign]


def breakdown(steps: float) -> dict[str, float]:
    """ms per decode step of each component's own time (callees that are timed apart
    excluded: `attention_rest` and `mlp_rest` are without their matmuls)."""
    own = {k: round(v * 1000 / steps, 2) for k, v in TIMES.items() if k != "steps"}
    return own | {"total": round(sum(own.values()), 2)}


async def profile(args: argparse.Namespace, streams: int, cache: bool) -> dict[str, object]:
    async with EdgeServer(models=args.model.parent, device="cpu", pool_size="3GiB",
                          prefix_cache=cache) as es:
        await es.load(args.model.name)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 1000, (8,), generator=gen).tolist() for _ in range(streams)]

        async def run() -> tuple[float, float, float]:
            assert es.engine is not None
            clock = time.pthread_getcpuclockid(es.engine._thread.ident or 0)
            main, step = time.thread_time(), time.clock_gettime(clock)
            start = time.perf_counter()
            await asyncio.gather(*[es.complete(args.model.name, p, max_tokens=args.tokens,
                                               temperature=0, ignore_eos=True)
                                   for p in prompts])
            return (time.perf_counter() - start, time.thread_time() - main,
                    time.clock_gettime(clock) - step)

        await run()                                     # warm-up
        TIMES.clear()
        wall, main, step = await run()
        steps = TIMES["steps"]
        return {"streams": streams, "prefix_cache": cache, "decode_steps": int(steps),
                "ms_per_step": breakdown(steps),
                "event_loop_cpu_ms_per_step": round(main * 1000 / steps, 2),
                "step_thread_cpu_ms_per_step": round(step * 1000 / steps, 2),
                "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face folder")
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prefix-cache", default="off,on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.model = args.model.resolve()
    torch.set_num_threads(args.threads)
    instrument()
    for streams in map(int, args.streams.split(",")):
        for cache in args.prefix_cache.split(","):
            row = asyncio.run(profile(args, streams, cache == "on"))
            print(json.dumps({"bench": "decode-profile", **row}), flush=True)


if __name__ == "__main__":
    main()
