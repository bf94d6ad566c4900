"""MoE expert cache: LRU against importance and importance+substitution, at 25% and 50%.

A Mixtral-architecture model (4 layers, 8 experts per layer, 2 active, 6 MB experts in
fp32; random weights with a spread router, made locally). For each budget and policy:
decode tokens/s (8 concurrent greedy streams), hit rate and expert bytes moved per token
during that decode, and accuracy against the full model: teacher-forced decode steps over
a fixed prompt set, top-1 agreement and mean KL(full || cached). One JSON line each, then
the ratios the targets are stated in. With --schemes int8,int4 the quantized variants run at
budget 0.5 (importance) too, and the bytes a miss moves are compared with float32's.

    .venv/bin/python bench/moe.py [--tokens 32] [--device cuda:0] [--schemes int8,int4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from edgeserve import EdgeServer
from edgeserve.batch import build_batch
from edgeserve.config import Config, ExpertConfig, PoolConfig
from edgeserve.model import ResidentModel

OUT = Path(__file__).parent / "out" / "moe-store"
MODEL = "mixtral-bench"
SIZE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
            num_local_experts=8, num_experts_per_tok=2)
PROMPTS = [torch.randint(1, 4000, (16,), generator=torch.Generator().manual_seed(s)).tolist()
           for s in range(8)]


def make_model() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    path = OUT / MODEL
    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**SIZE))
    with torch.no_grad():                      # a spread router: routing is not uniform
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)


def forced_logits(model: ResidentModel, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V): the logits before each of `tokens`, fed one by one (decode)."""
    pages: list = []
    device = torch.device(model.pool.device)
    try:
        model.kv.grow(pages, len(prompt) + len(tokens))
        batch = build_batch([(prompt, 0, pages)], model.kv.layout.page_tokens, device)
        out = [model.forward(batch)[0]]
        for i, t in enumerate(tokens[:-1]):
            batch = build_batch([([t], len(prompt) + i, pages)], model.kv.layout.page_tokens,
                                device)
            out.append(model.forward(batch)[0])
        return torch.stack(out)
    finally:
        model.kv.release(pages)


THRESHOLD = [0.1]
PREFETCH = [True]
STREAMS = [8]
DEVICE = ["cpu"]


async def measure(budget: float, policy: str, tokens: int,
                  reference: dict[str, object] | None, model_id: str = MODEL
                  ) -> dict[str, object]:
    cfg = Config(models=OUT, device=DEVICE[0], dtype="float32", pool=PoolConfig(pool_size=1 << 30),
                 experts=ExpertConfig(budget, policy, THRESHOLD[0], PREFETCH[0]))
    async with EdgeServer(config=cfg) as es:
        await es.load(model_id)
        model = es.models[model_id]
        start = time.perf_counter()
        outs = []
        for i in range(0, len(PROMPTS), STREAMS[0]):     # STREAMS concurrent requests
            outs += await asyncio.gather(*[
                es.complete(model_id, p, max_tokens=tokens, temperature=0, ignore_eos=True)
                for p in PROMPTS[i:i + STREAMS[0]]])
        rate = len(PROMPTS) * tokens / (time.perf_counter() - start)
        stats = model.offload.stats() if model.offload is not None else {}
        continuations = [o.token_ids for o in outs]
        if reference is None:
            reference = {"tokens": continuations}
        logits = await es.engine.run(lambda: [  # type: ignore[union-attr]
            forced_logits(model, p, c) for p, c in zip(PROMPTS, reference["tokens"],  # type: ignore[call-overload]
                                                       strict=True)])
    result: dict[str, object] = {"model": model_id, "budget": budget, "policy": policy,
                                 "threshold": THRESHOLD[0],
                                 "prefetch": PREFETCH[0], "streams": STREAMS[0],
                                 "decode_tok_s": round(rate, 1),
                                 "hit_rate": round(stats.get("hit_rate", 1.0), 3),
                                 "bytes_moved_per_token": round(
                                     stats.get("bytes_moved_per_token", 0.0)),
                                 "bytes_per_copy": stats.get("bytes_moved", 0) // max(
                                     1, stats.get("misses", 0) + stats.get("prefetches", 0)),
                                 "substitutions": stats.get("substitutions", 0)}
    if "logits" in reference:
        full = torch.cat(reference["logits"])  # type: ignore[arg-type]
        ours = torch.cat(logits)
        agree = (full.argmax(-1) == ours.argmax(-1)).float().mean()
        kl = torch.nn.functional.kl_div(ours.log_softmax(-1), full.log_softmax(-1),
                                        log_target=True, reduction="batchmean")
        result |= {"top1_agreement": round(float(agree), 4), "mean_kl": round(float(kl), 5)}
    else:
        reference["logits"] = logits
    return result | {"_reference": reference}


async def run(tokens: int, schemes: list[str]) -> None:
    full = await measure(1.0, "lru", tokens, None)
    reference = full.pop("_reference")
    print(json.dumps({"bench": "moe", **full}))
    rows = {}
    for budget in (0.25, 0.5):
        for policy in ("lru", "importance", "importance+substitution"):
            row = await measure(budget, policy, tokens, reference)  # type: ignore[arg-type]
            row.pop("_reference")
            rows[(budget, policy)] = row
            print(json.dumps({"bench": "moe", **row}))
    lru, best = rows[(0.5, "lru")], rows[(0.5, "importance+substitution")]
    print(json.dumps({"bench": "moe", "budget": 0.5,
                      "bytes_per_token_vs_lru": round(
                          best["bytes_moved_per_token"] / max(1, lru["bytes_moved_per_token"]),  # type: ignore[operator]
                          3),
                      "decode_latency_vs_lru": round(
                          lru["decode_tok_s"] / best["decode_tok_s"], 3)}))  # type: ignore[operator]
    base = rows[(0.5, "importance")]
    for scheme in schemes:          # quantized experts: a miss moves the quantized bytes
        row = await measure(0.5, "importance", tokens, reference, f"{MODEL}:{scheme}")  # type: ignore[arg-type]
        row.pop("_reference")
        row["bytes_per_copy_vs_fp32"] = round(
            row["bytes_per_copy"] / max(1, base["bytes_per_copy"]), 3)  # type: ignore[operator]
        print(json.dumps({"bench": "moe", **row}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="gate weight below which a miss may be substituted")
    parser.add_argument("--no-prefetch", action="store_true")
    parser.add_argument("--streams", type=int, default=8, help="concurrent decode streams")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:0 on a GPU")
    parser.add_argument("--schemes", default="", help="quantized variants too: int8,int4")
    args = parser.parse_args()
    DEVICE[0] = args.device
    THRESHOLD[0] = args.threshold
    PREFETCH[0] = not args.no_prefetch
    STREAMS[0] = args.streams
    make_model()
    asyncio.run(run(args.tokens, [s for s in args.schemes.split(",") if s]))


if __name__ == "__main__":
    main()
