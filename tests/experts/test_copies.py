"""Expert copies that run beside the computation.

The CPU copies at once, so the CUDA rules (wait for a copy before computing with it, let it
finish before its units are freed, computed resident experts first) are checked here with a
queue that copies only when it is told a copy's end is needed: a forgotten wait reads stale
pool bytes and changes the tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import pytest
import torch

from edgeserve import EdgeServer
from edgeserve.arch.moe import MoeModel
from edgeserve.config import Config, ExpertConfig, PoolConfig
from edgeserve.experts.copies import CopyQueue
from edgeserve.experts.offload import ExpertOffload
from edgeserve.tiers import HostSlab

from .test_offload import generate, moe_store, offloaded  # noqa: F401


class LateCopies(CopyQueue):
    """Copies held back until ready/settle/drain needs them; zeros meanwhile."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.held: dict[Hashable, Sequence[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.waited: list[Hashable] = []

    @property
    def overlaps(self) -> bool:
        return True

    def start(self, key: Hashable, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for dst, _ in pairs:
            dst.zero_()                         # stale bytes, should anything read them
        self.held[key] = pairs
        self.started += 1

    def is_pending(self, key: Hashable) -> bool:
        return key in self.held

    def ready(self, key: Hashable) -> None:
        for dst, src in self.held.pop(key, ()):
            dst.copy_(src)
            self.waited.append(key)

    settle = ready

    def drain(self) -> None:
        for key in list(self.held):
            self.ready(key)


def test_expert_order_does_not_change_the_sum():
    torch.manual_seed(0)
    spec = type("Spec", (), {"num_experts": 4})()
    experts = {e: (torch.randn(12, 8), torch.randn(8, 6)) for e in range(4)}
    runner = MoeModel.__new__(MoeModel)
    runner.spec = spec
    runner.expert_weights = lambda layer, e: experts[e]
    x = torch.randn(9, 8)
    ids = torch.randint(0, 4, (9, 2))
    gates = torch.rand(9, 2)
    plain = runner.run_experts(0, x, ids, gates)
    seen: list[int] = []

    def backwards(layer: int, picked: list[int]) -> list[int]:
        seen.extend(reversed(picked))
        return picked[::-1]

    runner.expert_order = backwards
    assert torch.equal(runner.run_experts(0, x, ids, gates), plain)
    assert seen == sorted(set(ids.flatten().tolist()), reverse=True)
    reference = torch.zeros_like(x)
    for a in range(2):
        for n in range(9):
            g, d = experts[int(ids[n, a])]
            gate, up = (x[n] @ g.T).chunk(2)
            reference[n] += gates[n, a] * ((torch.nn.functional.silu(gate) * up) @ d.T)
    assert torch.allclose(plain, reference, atol=1e-5)


@pytest.mark.parametrize("prefetch", [True, False])
async def test_copies_beside_the_computation_are_waited_for(moe_store, prefetch):  # noqa: F811
    async with EdgeServer(models=moe_store, device="cpu", pool_size="64MiB",
                          block_size="4KiB") as es:
        await es.load("mixtral")
        reference = await generate(es)
        offload: ExpertOffload = await offloaded(es, 0.5, "lru")
        offload.prefetching = prefetch
        late = offload.copies = LateCopies()
        order: list[tuple[int, list[int], set[int]]] = []
        picked_order = offload.order

        def watch(layer: int, picked: list[int]) -> list[int]:
            out = picked_order(layer, picked)
            order.append((layer, out, {e for e in picked if late.is_pending((layer, e))}))
            return out

        offload.order = watch
        es.models["mixtral"].runner.expert_order = watch
        assert await generate(es) == reference
        assert late.started > 0 and late.waited and not late.held
        assert offload.stats()["overlapped_copies"] == late.started
        with_copies = [(out, pending) for _, out, pending in order if pending]
        assert with_copies, "some layer computed while copies were in flight"
        for out, pending in with_copies:      # resident experts first, the copied ones last
            assert set(out[len(out) - len(pending):]) == pending
        es.pools["cpu"].check_integrity()


async def test_a_forward_failing_midway_leaves_no_copy_unordered(moe_store):  # noqa: F811
    async with EdgeServer(models=moe_store, device="cpu", pool_size="64MiB",
                          block_size="4KiB") as es:
        await es.load("mixtral")
        reference = await generate(es)
        offload: ExpertOffload = await offloaded(es, 0.5, "lru")
        late = offload.copies = LateCopies()
        runner = es.models["mixtral"].runner
        run = runner.run_experts
        failed: list[int] = []

        def failing(layer, x, ids, gates):
            out = run(layer, x, ids, gates)      # routed, copies started, prefetch issued
            if not failed:
                failed.append(layer)
                raise RuntimeError("out of memory, say")
            return out

        runner.run_experts = failing
        with pytest.raises(Exception, match="out of memory"):
            await es.complete("mixtral", [3, 1, 4, 1, 5], max_tokens=2, temperature=0)
        assert failed and not late.held              # every copy ordered before what follows
        assert set(offload.cache.resident) == set(offload.units)
        assert len(offload.units) <= offload.cache.capacity
        runner.run_experts = run
        assert await generate(es) == reference
        es.pools["cpu"].check_integrity()


def test_cpu_copies_are_plain_copies():
    queue = CopyQueue(torch.device("cpu"))
    dst, src = torch.zeros(4), torch.arange(4.0)
    queue.start("k", [(dst, src)])
    assert torch.equal(dst, src) and not queue.is_pending("k") and not queue.overlaps
    queue.ready("k")
    queue.settle("k")
    queue.drain()


def test_host_slab_carves_exact_aligned_tensors():
    slab = HostSlab([10, 64, 3 * 4])
    assert slab.nbytes == 64 + 64 + 64
    a = slab.take((5,), torch.float16)
    b = slab.take((4, 4), torch.float32)
    c = slab.take((3,), torch.float32)
    assert [t.data_ptr() - slab.buffer.data_ptr() for t in (a, b, c)] == [0, 64, 128]
    a.fill_(1)
    b.fill_(2)
    assert float(a.sum()) == 5 and float(b.sum()) == 32 and c.shape == (3,)
    with pytest.raises(ValueError, match="no room"):
        slab.take((1,), torch.float32)
    if not torch.cuda.is_available():
        assert slab.pin() is False and not slab.pinned      # nothing to page-lock for
    slab.unpin()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lru", "importance+substitution"])
async def test_cuda_copies_run_beside_the_computation(moe_store, policy):  # noqa: F811
    def config(budget: float) -> Config:      # threshold 0: nothing is substituted
        return Config(models=moe_store, device="cuda:0", dtype="float32",
                      pool=PoolConfig(64 << 20, 4096),
                      experts=ExpertConfig(budget, policy, threshold=0.0))

    async with EdgeServer(config=config(1.0)) as es:
        reference = await generate(es)
    async with EdgeServer(config=config(0.5)) as es:
        await es.load("mixtral")
        offload = es.models["mixtral"].offload
        assert offload.copies.overlaps and offload.slabs
        assert all(slab.pinned for slab in offload.slabs)    # page-locked by the load
        assert await generate(es) == reference
        stats = offload.stats()
        assert stats["misses"] > 0 and stats["overlapped_copies"] >= stats["misses"]
        assert not offload.copies.pending                # every copy waited for
        es.pools["cuda:0"].check_integrity()
        await es.unload("mixtral")
        assert not any(slab.pinned for slab in offload.slabs)    # pages given back
