"""The expert cache's decisions: hits, evictions by policy, substitution threshold."""

from __future__ import annotations

import pytest
import torch

from edgeserve.experts.cache import ExpertCache
from edgeserve.experts.importance import ExpertImportance
from edgeserve.experts.similarity import cached_similarity, layer_similarity


def picks(*rows: tuple[int, ...], weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(rows)
    return ids, torch.full(ids.shape, weight)


def test_everything_resident_is_all_hits():
    cache = ExpertCache(2, 4, capacity=8, policy="lru", expert_bytes=10)
    cache.warm([(layer, e) for layer in range(2) for e in range(4)])
    routed = cache.route(1, *picks((0, 3), (2, 1)))
    assert routed.fetch == [] and routed.evict == [] and routed.use == {0: 0, 1: 1, 2: 2, 3: 3}
    assert cache.stats.hits == 4 and cache.stats.bytes_moved == 0


def test_lru_evicts_least_recently_used_never_one_in_use():
    cache = ExpertCache(1, 6, capacity=3, policy="lru", expert_bytes=10)
    for e in (0, 1, 2):
        cache.route(0, *picks((e,)))
    cache.route(0, *picks((0,)))                        # 0 used again: 1 is now the oldest
    routed = cache.route(0, *picks((3, 2)))
    assert routed.fetch == [3] and routed.evict == [(0, 1)]
    assert cache.resident == {(0, 0), (0, 2), (0, 3)}
    routed = cache.route(0, *picks((4, 5), (0, 2)))     # four needed, three slots
    assert all(v not in {(0, 4), (0, 5), (0, 0), (0, 2)} for v in routed.evict)


def test_importance_evicts_the_least_important():
    cache = ExpertCache(1, 5, capacity=3, policy="importance", expert_bytes=10)
    for _ in range(5):
        cache.route(0, *picks((0, 1)))                  # 0 and 1 matter
    cache.route(0, *picks((2,)))                        # 2 seen once, most recently
    routed = cache.route(0, *picks((3,)))
    assert routed.evict == [(0, 2)]                     # LRU would have dropped 0


def test_substitution_only_below_the_threshold():
    sim = torch.tensor([[[-torch.inf, 0.9, 0.1], [0.9, -torch.inf, 0.2],
                         [0.1, 0.2, -torch.inf]]])
    def cache(policy: str = "importance+substitution") -> ExpertCache:
        c = ExpertCache(1, 3, capacity=2, policy=policy, expert_bytes=10, similarity=sim,
                        threshold=0.2)
        c.warm([(0, 1), (0, 2)])
        return c

    strong = cache().route(0, *picks((0,), weight=0.6))    # above the threshold: fetched
    assert strong.fetch == [0] and strong.use == {0: 0} and not strong.substituted
    c = cache()
    weak = c.route(0, *picks((0,), weight=0.05))            # below: the most similar resident
    assert weak.fetch == [] and weak.use == {0: 1} and weak.substituted == [0]
    assert c.stats.substitutions == 1 and c.stats.misses == 0
    plain = cache("importance")                             # never without substitution
    assert plain.route(0, *picks((0,), weight=0.05)).fetch == [0]


def test_prefetch_counts_hits_and_bad_settings():
    cache = ExpertCache(2, 4, capacity=4, policy="lru", expert_bytes=10)
    cache.prefetch(1, [2, 3])
    cache.route(1, *picks((2, 0)))
    assert cache.stats.prefetches == 2 and cache.stats.prefetch_hits == 1
    with pytest.raises(ValueError):
        ExpertCache(1, 2, capacity=1, policy="fifo", expert_bytes=1)
    with pytest.raises(ValueError):
        ExpertCache(1, 2, capacity=1, policy="importance+substitution", expert_bytes=1)


def test_importance_statistics_decay():
    imp = ExpertImportance(1, 3, decay=0.5, mass_weight=1.0)
    imp.observe(0, torch.tensor([[0, 1]]), torch.tensor([[0.75, 0.25]]))
    imp.observe(0, torch.tensor([[2, 1]]), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(imp.mass[0], torch.tensor([0.375, 0.625, 0.5], dtype=torch.float64))
    assert imp.score(0, 1) > imp.score(0, 2) > imp.score(0, 0)


def test_similarity_and_its_cache(tmp_path):
    g = torch.randn(8, 4)
    d = torch.randn(4, 4)
    layer = [(g, d), (2 * g, 2 * d), (-g, -d)]
    sim = layer_similarity(layer)
    assert torch.allclose(sim[0, 1], torch.tensor(1.0)) and torch.allclose(sim[0, 2],
                                                                          torch.tensor(-1.0))
    assert torch.isinf(sim.diagonal()).all()
    first = cached_similarity(tmp_path, "k", [layer])
    again = cached_similarity(tmp_path, "k")
    assert first is not None and again is not None and torch.equal(first, again)
    assert cached_similarity(tmp_path, "other") is None


def test_a_guess_never_displaces_a_more_important_expert():
    cache = ExpertCache(2, 4, capacity=2, policy="importance", expert_bytes=10)
    for _ in range(4):
        cache.route(1, *picks((0, 1)))                 # 0 and 1 matter, the cache is full
    weak = cache.importance.demand(*picks((2,), weight=0.1))
    assert cache.prefetch(1, [2], [0.0, 0.0, 0.0, 0.0]) == []      # asks nothing of 2
    assert cache.prefetch(1, [2], weak.tolist()) != []             # all of this step's demand
    assert (1, 2) in cache.resident and cache.stats.prefetches == 1
    lru = ExpertCache(2, 4, capacity=2, policy="lru", expert_bytes=10)
    lru.route(1, *picks((0, 1)))
    assert lru.prefetch(1, [2], [0.0] * 4) != []      # LRU (the baseline) always takes guesses


def test_similarity_layers_come_one_at_a_time_and_dense_layers_are_never_similar(tmp_path):
    g, d = torch.randn(8, 4), torch.randn(4, 4)
    layer = [(g, d), (2 * g, 2 * d), (-g, -d)]
    made: list[int] = []

    def layers():          # each layer's weights made only when the previous one is done
        for n in range(3):
            made.append(n)
            yield None if n == 1 else layer

    sim = cached_similarity(tmp_path, "gen", layers())
    assert made == [0, 1, 2] and sim is not None and sim.shape == (3, 3, 3)
    assert torch.equal(sim[0], layer_similarity(layer)) and torch.equal(sim[2], sim[0])
    assert torch.isinf(sim[1]).all() and (sim[1] < 0).all()
