"""Small forwards on the CPU: small ops on one thread, matmuls on all, same results."""

from __future__ import annotations

import pytest
import torch
from hf_models import load_resident

import edgeserve.arch.dense as dense
from edgeserve.arch import threads
from edgeserve.batch import build_batch
from edgeserve.pool import BlockPool

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_ops_narrow_to_one_thread_and_restore(two_threads):
    assert threads.wide() == 0
    with threads.small_ops(8, CPU):
        assert torch.get_num_threads() == 1
        assert threads.wide() == 2
        with threads.small_ops(8, CPU):            # nested: changes nothing
            assert torch.get_num_threads() == 1
        assert threads.wide() == 2
    assert torch.get_num_threads() == 2 and threads.wide() == 0
    with pytest.raises(RuntimeError), threads.small_ops(8, CPU):
        raise RuntimeError("a failed forward")
    assert torch.get_num_threads() == 2 and threads.wide() == 0


def test_large_forwards_and_other_devices_keep_every_thread(two_threads):
    with threads.small_ops(threads.SMALL_FORWARD_TOKENS + 1, CPU):
        assert torch.get_num_threads() == 2 and threads.wide() == 0
    with threads.small_ops(1, torch.device("meta")):
        assert torch.get_num_threads() == 2 and threads.wide() == 0


def test_decode_matmuls_get_every_thread_and_logits_are_unchanged(two_threads, tiny_store,
                                                                  monkeypatch):
    pool = BlockPool("cpu", 32 << 20, 4096)
    model = load_resident("llama", tiny_store / "llama", pool)
    rows = [[3, 1, 4, 1, 5], [9, 2, 6]]
    pages: list[list] = [[], []]
    for ids, p in zip(rows, pages, strict=True):
        model.kv.grow(p, len(ids) + 1)
        model.forward(build_batch([(ids, 0, p)], model.kv.layout.page_tokens, CPU))
    batch = build_batch([([7], len(ids), p) for ids, p in zip(rows, pages, strict=True)],
                        model.kv.layout.page_tokens, CPU)
    seen: list[tuple[int, int]] = []
    matmul = dense.matmul

    def counting(x, w, b=None):
        seen.append((torch.get_num_threads(), threads.wide()))
        return matmul(x, w, b)

    monkeypatch.setattr(dense, "matmul", counting)
    narrowed = model.forward(batch)
    assert seen and all(s == (2, 2) for s in seen)      # every matmul on both threads
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(dense.DenseModel, "small_ops_on_one_thread", False)
    seen.clear()
    assert torch.equal(model.forward(batch), narrowed)
    assert seen and all(s == (2, 0) for s in seen)
    for p in pages:
        model.kv.release(p)
    model.release(retain=False)
    pool.check_integrity()
