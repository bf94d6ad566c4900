"""Building the kernels: the per-user cache, concurrent builds, and torch's fallback."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator

import pytest
import torch

from edgeserve.kernels.cpu import build
from edgeserve.kernels.cpu import matmul as cpu

from .layouts import quantized

CC = shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    """Each test reads its own settings; later tests get the default library back."""
    cpu.reset()
    yield
    cpu.reset()


def results() -> list[torch.Tensor]:
    """Every layout with one row (vec.h), 3 (tiles) and 9 (dequantized into a buffer)."""
    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(33, 96, generator=g), torch.randn(33, generator=g)
    out = []
    for m in (1, 3, 9):
        x = torch.randn(m, 96, generator=g)
        out.append(cpu.linear_f32(x, w, b))
        for bits, fn in ((8, cpu.linear_int8), (4, cpu.linear_int4)):
            stored, scale, low, _ = quantized(33, 96, bits, seed=bits)
            out.append(fn(x, stored, scale, low, b))
    return out


@pytest.mark.skipif(CC is None, reason="needs a C compiler")
def test_built_once_into_the_cache_then_reused(tmp_path):
    assert CC is not None
    path = build.library(CC, tmp_path, build.PORTABLE)
    assert list(tmp_path.iterdir()) == [path] and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert build.library(CC, tmp_path, build.PORTABLE) == path
    assert path.stat().st_mtime_ns == stamp
    assert build.library(CC, tmp_path) != path          # other flags: another entry


@pytest.mark.skipif(CC is None, reason="needs a C compiler")
def test_concurrent_builds_leave_one_whole_library(tmp_path):
    assert CC is not None
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(
        str(build.library(CC, tmp_path, build.PORTABLE)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and [p.name for p in tmp_path.iterdir()] == [
        paths[0].rsplit("/", 1)[-1]]                     # no temporary file left behind
    cpu.Library(paths[0])                                # and it loads


def test_no_compiler_falls_back_to_torch_with_one_warning(tmp_path, monkeypatch, caplog):
    on = results() if cpu.library() is not None else None
    cpu.reset()
    monkeypatch.setenv("EDGESERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="edgeserve.kernels"):
        off = results()
        results()
    assert cpu.library() is None
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "no-such-cc" in caplog.records[0].getMessage()
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())
    if on is not None:
        for a, b in zip(on, off, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_failing_compiler_falls_back(tmp_path, monkeypatch, caplog):
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\n"
                    "echo 'error: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("EDGESERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(fake))
    with caplog.at_level(logging.WARNING, logger="edgeserve.kernels"):
        results()
    assert cpu.library() is None
    assert "broken" in caplog.text
    assert list((tmp_path / "kernels").iterdir()) == []             # temporary file removed


@pytest.mark.skipif(CC is None, reason="needs a C compiler")
@pytest.mark.parametrize(("refused", "expected"), [
    ("-march=native", build.PORTABLE),               # a compiler wanting -mcpu instead
    ("-fopenmp", build.SERIAL),                      # a compiler without OpenMP
])
def test_a_compiler_refusing_a_flag_builds_the_next_rung(tmp_path, monkeypatch, caplog,
                                                         refused, expected):
    on = results()
    cpu.reset()
    fake = tmp_path / "picky-cc"
    fake.write_text(f"#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = {refused} ] && "
                    f"echo 'unknown option {refused}' >&2 && exit 1; done\nexec {CC} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("EDGESERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(fake))
    assert build.first_library(str(fake), tmp_path / "direct")[1] == expected
    with caplog.at_level(logging.WARNING, logger="edgeserve.kernels"):
        off = results()
    assert cpu.library() is not None
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert " ".join(expected) in caplog.records[0].getMessage()
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_switched_off(monkeypatch, caplog):
    on = results()
    cpu.reset()
    monkeypatch.setenv("EDGESERVE_CPU_KERNELS", "off")
    with caplog.at_level(logging.WARNING, logger="edgeserve.kernels"):
        off = results()
    assert cpu.library() is None and caplog.records == []
    assert cpu.few_rows_f32(torch.randn(1, 8), torch.randn(4, 8)) is None
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


AVX2 = (*build.PORTABLE, "-mavx2", "-mfma", "-mf16c")


@pytest.mark.skipif(CC is None, reason="needs a C compiler")
@pytest.mark.parametrize("flags", [build.PORTABLE, AVX2], ids=["portable", "avx2"])
def test_other_targets_agree(tmp_path, flags):
    """Built for the compiler's default target (the generic vector code and float16
    conversion by hand where the default has no F16C) or for AVX2 without AVX-512, not
    this CPU: the same results."""
    assert CC is not None
    if flags == AVX2 and "avx2" not in build.cpu_features().split():
        pytest.skip("this CPU has no AVX2")
    native = results()
    lib = cpu.Library(str(build.library(CC, tmp_path, flags)))
    cpu.reset()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(cpu, "_library", lib)
    monkeypatch.setattr(cpu, "_tried", True)
    try:
        portable = results()
    finally:
        monkeypatch.undo()
    for a, b in zip(native, portable, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
