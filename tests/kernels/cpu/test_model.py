"""A whole model decodes the same greedy tokens with the CPU kernels (the matmuls and the
fused decode step) on and off (fp32)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from edgeserve import EdgeServer
from edgeserve.kernels.cpu import decode
from edgeserve.kernels.cpu import matmul as cpu

MODEL = "demo-llama"
PROMPTS = ["The capital of France is", "def fib(n):", "1, 2, 3,", "Once upon a time"]


async def greedy(store: Path) -> list[list[int]]:
    async with EdgeServer(models=store, device="cpu", pool_size="256MiB") as es:
        outs = await asyncio.gather(*[es.complete(MODEL, p, max_tokens=24, temperature=0,
                                                  ignore_eos=True) for p in PROMPTS])
        es.pools["cpu"].check_integrity()
    return [o.token_ids for o in outs]


async def test_greedy_output_is_the_same_with_kernels_on_and_off(demo_store, monkeypatch):
    cpu.reset()
    if cpu.library() is None:
        pytest.skip("the CPU kernels could not be built here")
    calls = {"kernel": 0, "fused": 0}
    real, fused = cpu.few_rows_f32, decode._function

    def counted(x: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None = None) -> torch.Tensor | None:
        y = real(x, w, b)
        calls["kernel"] += y is not None
        return y

    def fused_counted(lib: cpu.Library, name: str) -> object:
        calls["fused"] += name == "es_decode_layers"
        return fused(lib, name)

    monkeypatch.setattr(cpu, "few_rows_f32", counted)
    monkeypatch.setattr(decode, "_function", fused_counted)
    on = await greedy(demo_store)
    assert calls["kernel"] > 0                      # decode steps went through the kernel
    assert calls["fused"] >= 23                     # every decode step through decode.c
    monkeypatch.setenv("EDGESERVE_CPU_KERNELS", "off")
    cpu.reset()
    seen = dict(calls)
    try:
        off = await greedy(demo_store)
    finally:
        cpu.reset()
    assert calls == seen                            # and now none did
    assert on == off
