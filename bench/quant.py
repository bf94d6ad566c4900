"""Quantized models on one device: bytes, prefill, decode and agreement with fp32.

For fp32, bf16, int8 and int4 variants of one Llama-family model (by default a random model
of SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocabulary 49152, tied embeddings; `--model DIR` for a real one): device bytes, prefill
tokens/s at 512 tokens, aggregate decode tokens/s with 1, 8 and 32 streams, and top-1
agreement and mean KL against fp32, teacher-forced over 32 prompts x 64 tokens. Also how
many int8 against fp32 models fit in bench/multimodel.py's pool, and llama.cpp's figures
where GGUF files are given (--gguf) and its programs are found (bench/llamacpp.py):
`llama-bench` for prefill, `llama-batched-bench -npp 8 -ntg TOKENS -npl 1,8,32` for decode.
Prints one JSON line per variant, then one summary line with the ratios.

Decode tokens/s (`decode_N_tok_s`) count, over all N streams, the tokens after each
stream's first, over the time from the earliest first token to the latest last one: the
generation steps only, as llama-batched-bench's TG figure counts them. `e2e_N_tok_s` is
every token over the whole request time (prefill and admission included).

    .venv/bin/python bench/quant.py [--model DIR] [--tokens 32] [--repeats 3] [--only fp32]
                                    [--gguf F32=a.gguf,Q8_0=b.gguf,Q4_1=c.gguf]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import llamacpp
import torch

from edgeserve import EdgeServer
from edgeserve.checkpoint import HashCache
from edgeserve.loader import LoadContext, parse_dtype
from edgeserve.model import ResidentModel
from edgeserve.pool import BlockPool
from edgeserve.quant.cache import QuantCache
from edgeserve.quant.quality import Agreement, compare, logits_of

OUT = Path(__file__).parent / "out" / "quant-store"
SMOLLM2: dict[str, Any] = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0,
               rms_norm_eps=1e-5)
VARIANTS = {"fp32": ("", "float32"), "bf16": ("", "bfloat16"),
            "int8": (":int8", "float32"), "int4": (":int4", "float32")}


def make_model() -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = OUT / "smollm2-shape"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2)).save_pretrained(path)
    return path


def ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Run(NamedTuple):
    seconds: float          # from submitting every prompt to the last token
    decode_seconds: float   # from the earliest first token to the latest last token
    decode_tokens: int      # tokens after each stream's first


async def once(es: EdgeServer, model: str, prompts: list[list[int]], tokens: int) -> Run:
    """Every prompt gets `tokens` new tokens, all running together."""
    async def stream(prompt: list[int]) -> tuple[float, float, int]:
        first = last = 0.0
        decoded = 0                 # tokens after those the first delta brought
        async for delta in es.stream_complete(model, prompt, max_tokens=tokens, temperature=0,
                                              ignore_eos=True):
            if delta.token_ids:
                last = time.perf_counter()
                decoded += len(delta.token_ids) if first else 0
                first = first or last
        return first, last, decoded

    start = time.perf_counter()
    marks = await asyncio.gather(*[stream(p) for p in prompts])
    end = time.perf_counter()
    marks = [m for m in marks if m[0]]             # streams that produced tokens
    return Run(end - start, max(m[1] for m in marks) - min(m[0] for m in marks),
               sum(m[2] for m in marks))


async def speed(store: Path, name: str, variants: list[str], vocab: int,
                args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """fp32, int8 and int4 resident together in one server, rounds alternating them so that
    noise on a shared machine hits all alike; then bf16 in a server of its own (computing in
    bf16), after the first is closed. Two servers alive at once slow each other's steps on
    the CPU (each step thread keeps its own team of compute threads): measured 34 against
    22 tok/s for fp32 with one stream, so they never run side by side here."""
    tests = {"prefill_512_tok_s": ([ids(512, vocab, 1)], 1)} | {
        f"decode_{n}_tok_s": ([ids(8, vocab, 100 + s) for s in range(n)], args.tokens)
        for n in (1, 8, 32)}
    out: dict[str, dict[str, float]] = {}
    for dtype, group in (("float32", [v for v in variants if v != "bf16"]),
                         ("bfloat16", [v for v in variants if v == "bf16"])):
        if not group:
            continue
        # Without prefix reuse: every round computes its prompts (they repeat across rounds).
        async with EdgeServer(models=store, device="cpu", pool_size=args.pool_size,
                              dtype=dtype, prefix_cache=False) as es:
            models = {v: name + VARIANTS[v][0] for v in group}
            for v, model in models.items():
                report = await es.load(model)
                out[v] = {"device_bytes": report.bytes_total,
                          "quantize_s": round(report.quantize_seconds, 2)}
            runs = await rounds(es, models, tests, args.repeats)
            for pool in es.pools.values():
                pool.check_integrity()
        for (v, test), rs in runs.items():
            prompts, tokens = tests[test]
            if test.startswith("prefill"):
                out[v][test] = round(512 / statistics.median(r.seconds for r in rs), 1)
                continue
            out[v][test] = round(statistics.median(r.decode_tokens / r.decode_seconds
                                                   for r in rs), 1)
            out[v][test.replace("decode", "e2e")] = round(
                len(prompts) * tokens / statistics.median(r.seconds for r in rs), 1)
    return out


async def rounds(es: EdgeServer, models: dict[str, str],
                 tests: dict[str, tuple[list[list[int]], int]], repeats: int
                 ) -> dict[tuple[str, str], list[Run]]:
    """Every test on every model, `repeats` rounds after a warm-up round."""
    runs: dict[tuple[str, str], list[Run]] = {}
    for r in range(repeats + 1):              # round 0 warms up
        for test, (prompts, tokens) in tests.items():
            for v, model in models.items():
                run = await once(es, model, prompts, tokens)
                if r:
                    runs.setdefault((v, test), []).append(run)
    return runs


def text_prompts(path: Path, n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens of real text (this repository's README) where the model
    has a tokenizer; [] where it has none (random token ids are used then)."""
    if not (path / "tokenizer.json").is_file():
        return []
    from tokenizers import Tokenizer

    tokens = Tokenizer.from_file(str(path / "tokenizer.json")).encode(
        (Path(__file__).parent.parent / "README.md").read_text()).ids
    step = max(length, (len(tokens) - length) // n)
    return [tokens[i * step:i * step + length] for i in range(n)
            if len(tokens[i * step:i * step + length]) == length]


def quality(path: Path, store: Path, args: argparse.Namespace) -> dict[str, Agreement]:
    """Teacher-forced agreement of every variant with fp32, models loaded straight into a
    pool (no server)."""
    hashes = HashCache(store)
    vocab = int(SMOLLM2["vocab_size"]) if args.model is None else \
        int(json.loads((path / "config.json").read_text())["vocab_size"])
    prompts = text_prompts(path, args.quality_prompts, args.quality_tokens) or \
        [ids(args.quality_tokens, vocab, 10_000 + i) for i in range(args.quality_prompts)]
    pool = BlockPool("cpu", 3 << 30, 1 << 20)
    teacher = None
    out: dict[str, Agreement] = {}
    for name, (tag, dtype) in VARIANTS.items():
        folder = QuantCache(store, hashes).folder(path, tag[1:])[0] if tag else path
        ctx = LoadContext(pool, parse_dtype(dtype), hashes)
        model = ResidentModel.load(name, folder, ctx)
        logits = torch.cat([logits_of(model, p) for p in prompts])
        if teacher is None:
            teacher = logits
        out[name] = compare(teacher, logits)
        model.release(retain=False)
    pool.check_integrity()
    return out


def capacity() -> dict[str, int]:
    """Models resident at once in bench/multimodel.py's pool, fp32 against int8: each
    variant's bytes measured by loading it, the pool's blocks divided by them."""
    import multimodel

    total = multimodel.make_store()
    pool_size = total // 2 + (8 << 20)
    out = {}

    async def one(model: str) -> int:
        async with EdgeServer(models=multimodel.OUT, device="cpu", pool_size=pool_size) as es:
            await es.load(model)
            return int(es.stats()["devices"]["cpu"]["resident_models"][model])

    for name, model in (("fp32", "base-a"), ("int8", "base-a:int8"), ("int4", "base-a:int4")):
        out[f"{name}_models_in_pool"] = pool_size // asyncio.run(one(model))
    out["pool_bytes"] = pool_size
    return out


def versus(rows: dict[str, dict[str, object]],
           peers: dict[str, dict[str, float]]) -> dict[str, float]:
    """edgeserve / llama.cpp decode tokens/s, per variant and stream count, where llama.cpp
    ran a file of the same precision."""
    out = {}
    for variant, row in rows.items():
        label = next((p for p in llamacpp.PEERS.get(variant, ()) if p in peers), None)
        for key, theirs in peers.get(label or "", {}).items():
            ours = row.get(key)
            if isinstance(ours, float) and theirs > 0:
                out[f"{variant}_vs_{label}_{key.removesuffix('_tok_s')}"] = round(ours / theirs, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face folder")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quality-prompts", type=int, default=32)
    parser.add_argument("--quality-tokens", type=int, default=64)
    parser.add_argument("--pool-size", default="3GiB")
    parser.add_argument("--gguf", default="",
                        help="LABEL=file.gguf,... for llama-bench and llama-batched-bench")
    parser.add_argument("--only", default=",".join(VARIANTS), help="variants to time")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-capacity", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = make_model() if args.model is None else args.model.resolve()
    store = path.parent
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    variants = [v for v in args.only.split(",") if v]
    measured = asyncio.run(speed(store, path.name, variants, vocab, args)) if variants else {}
    rows: dict[str, dict[str, object]] = {}
    for name in variants:
        rows[name] = {"bench": "quant", "variant": name, "model": path.name, **measured[name]}
        print(json.dumps(rows[name]), flush=True)
    if not args.skip_quality:
        for name, a in quality(path, store, args).items():
            rows.setdefault(name, {"variant": name}).update(
                top1=round(a.top1, 4), mean_kl=round(a.kl, 5), positions=a.positions)
    summary: dict[str, object] = {"bench": "quant-summary", "variants": rows}
    fp32 = rows.get("fp32", {})
    for name, row in rows.items():
        if name != "fp32" and "device_bytes" in row and "device_bytes" in fp32:
            summary[f"{name}_bytes_vs_fp32"] = round(
                float(row["device_bytes"]) / float(fp32["device_bytes"]), 3)  # type: ignore[arg-type]
    if not args.skip_capacity:
        summary["capacity"] = capacity()
    threads = torch.get_num_threads()
    summary["llama_cpp"] = llamacpp.bench(args.gguf, args.tokens, threads)
    batched = llamacpp.batched(args.gguf, args.tokens, threads)
    summary["llama_cpp_batched"] = batched
    summary["decode_vs_llama_cpp"] = versus(rows, batched)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
