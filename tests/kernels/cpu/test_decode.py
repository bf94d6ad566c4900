"""The fused decode step (decode.c) against the torch path and against transformers.

Several sequences of different lengths decode together, their KV spanning several pages,
over float32, int8 and int4 weights, for every dense architecture: GQA, qkv bias, Qwen3's
per-head q/k norms, Mistral's sliding window (crossed), Llama 3's rotary scaling.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_models import ARCHS, MOE_ARCHS, load_resident, make_model, reference

from edgeserve.arch import build_model
from edgeserve.arch.plan import EMBED, HEAD
from edgeserve.batch import StepBatch, build_batch
from edgeserve.kernels.cpu import build, decode
from edgeserve.kernels.cpu import matmul as cpu
from edgeserve.loader import weight_views
from edgeserve.pool import BlockPool, UnitKind
from edgeserve.quant.format import quantize
from edgeserve.quant.linear import QWeight

CPU = torch.device("cpu")
CC = shutil.which("cc") or shutil.which("gcc")
LENGTHS = (3, 11, 26)          # prompt lengths: rows of different lengths in one batch
STEPS = 9                      # decode steps: the 26-token row passes Mistral's window of 12


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dense architectures with a feed-forward width quantizable in groups of 32."""
    root = tmp_path_factory.mktemp("decode")
    for seed, arch in enumerate(ARCHS):
        make_model(arch, root / arch, seed=seed + 40, intermediate_size=128)
    for seed, arch in enumerate(MOE_ARCHS):
        make_model(arch, root / arch, seed=seed + 60)
    return root


@pytest.fixture(autouse=True)
def kernels() -> Iterator[None]:
    cpu.reset()
    if cpu.library() is None:
        pytest.skip("the CPU kernels could not be built here")
    yield
    cpu.reset()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Calls of the C library: whole stacks of layers, attention halves, final norm and head."""
    seen = {"fused": 0, "attention": 0, "head": 0}
    real = decode._function
    names = {"es_decode_layers": "fused", "es_decode_attention": "attention",
             "es_decode_head": "head"}

    def counted(lib: cpu.Library, name: str) -> Any:
        seen[names[name]] += 1
        return real(lib, name)

    monkeypatch.setattr(decode, "_function", counted)
    return seen


def views(model: Any, scheme: str | None) -> dict[str, Any]:
    """The model's weight views, every linear, the embedding and the head quantized with
    `scheme` (None: float32)."""
    w: dict[str, Any] = weight_views(model.pool, model.units, model.spec, torch.float32)
    if scheme is not None:
        for name, t in list(w.items()):
            if name.endswith("proj.weight") or name in (EMBED, HEAD):
                w[name] = QWeight.of(scheme, quantize(scheme, t))
    return w


def batch_of(seqs: list[list[int]], pages: list[list[Any]], model: Any,
             new: int | None = None) -> StepBatch:
    """The next step of every sequence: its last token (or all of them, a prefill)."""
    chunks = [(ids if new is None else ids[-new:], 0 if new is None else len(ids) - new, p)
              for ids, p in zip(seqs, pages, strict=True)]
    return build_batch(chunks, model.kv.layout.page_tokens, CPU)


def torch_only(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's forward without decode.c."""
    monkeypatch.setattr(model.fused, "run", lambda *a: False)
    monkeypatch.setattr(model.fused, "attend", lambda *a: None)
    monkeypatch.setattr(model.fused, "logits", lambda *a: None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_step_equals_the_torch_path(arch: str, scheme: str | None, parallel: bool,
                                          store: Path, calls: dict[str, int],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if parallel:                    # attention shared by threads, however small
        monkeypatch.setattr(decode, "PARALLEL_FROM", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    against_torch(arch, scheme, store, calls, monkeypatch)


AVX2 = (*build.PORTABLE, "-mavx2", "-mfma", "-mf16c")


@pytest.mark.skipif(CC is None, reason="needs a C compiler")
@pytest.mark.parametrize("flags", [build.PORTABLE, AVX2], ids=["portable", "avx2"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_other_targets_decode_alike(arch: str, flags: tuple[str, ...], tmp_path: Path,
                                    store: Path, calls: dict[str, int],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Built for the compiler's default target (4-lane generic vectors) or for AVX2 (8
    lanes), not this CPU: the fused step still equals the torch path."""
    assert CC is not None
    if flags == AVX2 and "avx2" not in build.cpu_features().split():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(cpu, "_library", cpu.Library(str(build.library(CC, tmp_path, flags))))
    monkeypatch.setattr(cpu, "_tried", True)
    against_torch(arch, "int4", store, calls, monkeypatch)


def against_torch(arch: str, scheme: str | None, store: Path, calls: dict[str, int],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of LENGTHS prompts decode STEPS steps: each step's logits and KV writes through
    the fused step equal the torch path's."""
    pool = BlockPool("cpu", 32 << 20, 4096)             # small blocks: pages of few tokens
    model = load_resident(arch, store / arch, pool)
    weights = views(model, scheme)
    fused, plain = build_model(model.spec, weights), build_model(model.spec, weights)
    torch_only(plain, monkeypatch)
    gen = torch.Generator().manual_seed(len(arch))
    seqs = [torch.randint(0, model.spec.vocab_size, (n,), generator=gen).tolist()
            for n in LENGTHS]
    pages: list[list[Any]] = [[] for _ in seqs]
    for ids, p in zip(seqs, pages, strict=True):
        model.kv.grow(p, len(ids))
    logits = plain.forward(batch_of(seqs, pages, model), model.kv.view)     # prefill
    assert calls["fused"] == 0
    for step in range(STEPS):
        for ids, p, row in zip(seqs, pages, logits, strict=True):
            ids.append(int(row.argmax()))
            model.kv.grow(p, len(ids))
        batch = batch_of(seqs, pages, model, new=1)
        logits = fused.forward(batch, model.kv.view)
        assert calls["fused"] == calls["head"] == step + 1    # the step went through C
        written = model.kv.view[batch.slot_page].clone()
        expected = plain.forward(batch, model.kv.view)   # rewrites the same slots
        assert rel(logits, expected) < 1e-5
        assert rel(written, model.kv.view[batch.slot_page]) < 1e-5
    assert max(len(p) for p in pages) > 3                # rows span several pages
    for p in pages:
        model.kv.release(p)
    model.release(retain=False)
    pool.check_integrity()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_rows_decoded_together_match_transformers(arch: str, tiny_store: Path,
                                                  calls: dict[str, int]) -> None:
    pool = BlockPool("cpu", 32 << 20, 4096)
    model = load_resident(arch, tiny_store / arch, pool)
    ref = reference(tiny_store / arch)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, model.spec.vocab_size, (n,), generator=gen).tolist()
            for n in LENGTHS]
    pages: list[list[Any]] = [[] for _ in seqs]
    for ids, p in zip(seqs, pages, strict=True):
        model.kv.grow(p, len(ids))
    model.forward(batch_of(seqs, pages, model))
    for _ in range(STEPS):
        for ids, p in zip(seqs, pages, strict=True):
            ids.append(int(torch.randint(0, model.spec.vocab_size, (1,), generator=gen)))
            model.kv.grow(p, len(ids))
        logits = model.forward(batch_of(seqs, pages, model, new=1))
        for ids, row in zip(seqs, logits, strict=True):
            with torch.no_grad():
                expected = ref(torch.tensor([ids])).logits[0, -1]
            assert rel(row, expected) < 1e-4
    assert calls["fused"] == STEPS
    for p in pages:
        model.kv.release(p)
    model.release(retain=False)


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_moe_attention_halves_equal_the_torch_path(arch: str, store: Path, calls: dict[str, int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """MoE layers keep their feed-forward in torch; their attention halves run in C (not
    OLMoE's: clipped q, k, v and whole-projection norms)."""
    pool = BlockPool("cpu", 32 << 20, 4096)
    model = load_resident(arch, store / arch, pool)
    weights = views(model, None)
    fused, plain = build_model(model.spec, weights), build_model(model.spec, weights)
    torch_only(plain, monkeypatch)
    seqs = [[7, 3, 9, 4, 1][:n] * 6 for n in (1, 3, 5)]      # 6, 18, 30 tokens
    pages: list[list[Any]] = [[] for _ in seqs]
    for ids, p in zip(seqs, pages, strict=True):
        model.kv.grow(p, len(ids))
    logits = plain.forward(batch_of(seqs, pages, model), model.kv.view)
    for step in range(4):
        for ids, p, row in zip(seqs, pages, logits, strict=True):
            ids.append(int(row.argmax()))
            model.kv.grow(p, len(ids))
        batch = batch_of(seqs, pages, model, new=1)
        logits = fused.forward(batch, model.kv.view)
        assert rel(logits, plain.forward(batch, model.kv.view)) < 1e-5
        layers = model.spec.num_layers if arch != "olmoe" else 0
        assert calls["attention"] == layers * (step + 1) and calls["fused"] == 0
    for p in pages:
        model.kv.release(p)
    model.release(retain=False)


def test_unsupported_cases_take_the_torch_path(tiny_store: Path, calls: dict[str, int],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BlockPool("cpu", 32 << 20, 4096)
    model = load_resident("llama", tiny_store / "llama", pool)
    pages: list[Any] = []
    model.kv.grow(pages, 5)
    prefill = build_batch([([1, 2, 3, 4], 0, pages)], model.kv.layout.page_tokens, CPU)
    step = build_batch([([5], 4, pages)], model.kv.layout.page_tokens, CPU)
    runner = model.runner
    x = torch.zeros(1, 1, model.spec.hidden_size)
    assert not runner.fused.run(prefill, model.kv.view, x)          # more than one token
    assert runner.fused.logits(prefill, x[:, 0]) is None
    assert not runner.fused.run(step, model.kv.view.to(torch.bfloat16), x)
    monkeypatch.setattr(step, "delta", object())
    assert not runner.fused.run(step, model.kv.view, x)             # task blocks
    assert runner.fused.logits(step, x[:, 0]) is None
    bf16 = build_model(model.spec, {k: v.to(torch.bfloat16) for k, v in
                                    weight_views(pool, model.units, model.spec,
                                                 torch.float32).items()})
    monkeypatch.setattr(step, "delta", None)
    assert not bf16.fused.run(step, model.kv.view, x) and "bfloat16" in bf16.fused.why
    with monkeypatch.context() as m:                                # a step off the CPU
        m.setattr(cpu, "library", lambda: pytest.fail("the library was asked for"))
        assert not runner.fused.run(step, model.kv.view, x.to("meta"))
        assert runner.fused.logits(step, x[:, 0].to("meta")) is None
    monkeypatch.setattr(decode, "FLOAT_ROWS", 0)                   # more rows than it takes
    fresh = build_model(model.spec, weight_views(pool, model.units, model.spec, torch.float32))
    assert not fresh.fused.run(step, model.kv.view, x)
    monkeypatch.setenv("CC", "no-such-compiler")
    cpu.reset()
    assert not runner.fused.run(step, model.kv.view, x)             # no compiler
    monkeypatch.setenv("EDGESERVE_CPU_KERNELS", "off")
    cpu.reset()
    assert not runner.fused.run(step, model.kv.view, x)             # kernels off
    assert runner.fused.logits(step, x[:, 0]) is None
    assert calls == {"fused": 0, "attention": 0, "head": 0} and bool((x == 0).all())
    model.kv.release(pages)
    model.release(retain=False)


def test_weights_are_read_where_compaction_moved_them(tiny_store: Path, calls: dict[str, int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BlockPool("cpu", 32 << 20, 4096)
    spacer = pool.allocate(UnitKind.WEIGHT, 1 << 20, owner="spacer")
    model = load_resident("qwen2", tiny_store / "qwen2", pool)
    seq, pages = [3, 1, 4, 1, 5, 9, 2], []                  # type: list[int], list[Any]
    model.kv.grow(pages, len(seq))
    model.forward(batch_of([seq], [pages], model))
    before = model.runner
    pool.release(spacer)
    assert pool.compact() > 0                               # every unit slid down
    seq.append(6)
    model.kv.grow(pages, len(seq))
    batch = batch_of([seq], [pages], model, new=1)
    filler = pool.allocate(UnitKind.WEIGHT, 8 << 20, owner="filler")   # where units were
    pool.raw(filler).fill_(255)                             # float32 NaNs
    assert model.runner is not before                       # views (and pointers) anew
    logits = model.forward(batch)
    assert calls["fused"] == 1
    plain = build_model(model.spec, weight_views(pool, model.units, model.spec, torch.float32))
    torch_only(plain, monkeypatch)
    assert rel(logits, plain.forward(batch, model.kv.view)) < 1e-5
    model.kv.release(pages)
    model.release(retain=False)
    pool.release(filler)
    pool.check_integrity()
