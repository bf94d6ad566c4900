"""Structured output cost: decode tokens/s of 8 streams constrained by a moderately complex
JSON schema (bench/schemas.py) against 8 free streams, same model, same prompts, every
stream running to max_tokens (EOS ignored; the schema is longer than max_tokens).

Also reports the grammar's compile time (first time, and again from the cache; the
vocabulary's compiler, made once per model, apart) and the
mask's time per step (filling the bitmasks of the batch's constrained rows and applying them
to the logits), measured around the engine's hook. Rounds alternate the two modes; ratios
are medians. Prints one JSON line.

    .venv/bin/python bench/structured.py [--model small|demo] [--streams 8] [--tokens 96]
                                         [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import edgeserve.engine
from edgeserve import EdgeServer
from edgeserve.constrain import Grammar, compile_grammar
from edgeserve.constrain.grammar import compiler_for
from edgeserve.demo import build_demo

sys.path.insert(0, str(Path(__file__).parent))
from schemas import SCHEMA

OUT = Path(__file__).parent / "out"
MASK_TIMES: list[float] = []
# A Llama of about 75 M parameters with a 32k byte-level BPE vocabulary (trained locally on
# the standard library's source by bench/grammars.py): the mask's cost grows with the
# vocabulary, the forward's with the model.
SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)


def make_small() -> str:
    """bench/out/structured-small, built once (random weights)."""
    from grammars import train
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeserve.demo import CHAT_TEMPLATE

    path = OUT / "structured-small"
    if (path / "config.json").is_file():
        return path.name
    tok = train(32000)
    eos = tok.token_to_id("<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos,
                         **SMALL)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<eos>", "eos_token": "<eos>", "tokenizer_class": "PreTrainedTokenizerFast",
         "added_tokens_decoder": {str(eos): {"content": "<eos>", "special": True}}}))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path.name


def _timed_mask() -> None:
    inner = edgeserve.engine.mask_logits

    def timed(logits: torch.Tensor, states: Any) -> torch.Tensor:
        if not any(s is not None for s in states):
            return inner(logits, states)
        start = time.perf_counter()
        out = inner(logits, states)
        MASK_TIMES.append(time.perf_counter() - start)
        return out
    edgeserve.engine.mask_logits = timed            # type: ignore[assignment]


async def _round(es: EdgeServer, model: str, streams: int, tokens: int,
                 grammar: Grammar | None) -> tuple[float, int]:
    async def one(i: int) -> int:
        out = await es.chat(model, [{"role": "user", "content": f"Customer record {i}."}],
                            max_tokens=tokens, temperature=1.0, seed=i, grammar=grammar,
                            ignore_eos=True)
        return len(out.token_ids)
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts) / (time.perf_counter() - start), sum(counts)


async def main(args: argparse.Namespace) -> None:
    if args.model == "demo":
        name = "demo-llama"
        if not (OUT / name / "config.json").is_file():
            build_demo(OUT)
    else:
        name = make_small()
    _timed_mask()
    grammar = Grammar.json_schema(SCHEMA, strict=True)
    async with EdgeServer(models=OUT, device="cpu", pool_size="2GiB") as es:
        await es.load(name)
        model, tokenizer = es.models[name], es.tokenizer(name)
        assert tokenizer is not None
        stops = model.eos_token_ids | tokenizer.eos_token_ids
        start = time.perf_counter()
        compiler_for(tokenizer, model.spec.vocab_size, stops)       # once per vocabulary
        vocabulary = time.perf_counter() - start
        start = time.perf_counter()
        compile_grammar(grammar, tokenizer, model.spec.vocab_size, stops)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        compile_grammar(grammar, tokenizer, model.spec.vocab_size, stops)
        cached = time.perf_counter() - start
        await _round(es, name, args.streams, 8, None)       # warm-up
        free, constrained, ratios, tokens = [], [], [], [0, 0]
        for _ in range(args.repeats):
            f, nf = await _round(es, name, args.streams, args.tokens, None)
            c, nc = await _round(es, name, args.streams, args.tokens, grammar)
            free.append(f)
            constrained.append(c)
            ratios.append(c / f)
            tokens[0] += nf
            tokens[1] += nc
    print(json.dumps({
        "model": name, "streams": args.streams, "vocab": model.spec.vocab_size,
        "free_tok_s": round(statistics.median(free), 1),
        "constrained_tok_s": round(statistics.median(constrained), 1),
        "constrained_over_free": round(statistics.median(ratios), 3),
        "tokens": {"free": tokens[0], "constrained": tokens[1]},
        # The mask's share of a constrained decode step (a step makes `streams` tokens).
        "mask_share_of_step": round(statistics.median(MASK_TIMES)
                                    / (args.streams / statistics.median(constrained)), 4),
        "mask_ms_per_step_median": round(1e3 * statistics.median(MASK_TIMES), 3),
        "mask_ms_per_step_mean": round(1e3 * statistics.fmean(MASK_TIMES), 3),
        "vocabulary_ms": round(1e3 * vocabulary, 1), "compile_ms_first": round(1e3 * cold, 2),
        "compile_ms_cached": round(1e3 * cached, 3)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "demo"], default="small")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    torch.set_num_threads(2)
    asyncio.run(main(parser.parse_args()))
