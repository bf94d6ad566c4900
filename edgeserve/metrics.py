"""Prometheus metrics: vLLM's names where one exists, edgeserve's own for the pool.

Each EdgeServer has its own registry, so several can live in one process (tests do).
Request timings are recorded by the API layer; pool and queue figures are read at scrape
time from the live objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeserve.recent import Recent

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        model = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", model,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", model,
                                         registry=r)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", model,
            registry=r)
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", model,
            registry=r)
        self.requests = Counter("vllm:request_success", "Requests finished, by reason.",
                                [*model, "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              model, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens.",
                             model, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency.", model,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time waiting to start.",
                               model, buckets=LATENCY_BUCKETS, registry=r)
        self.loads = Counter("edgeserve:model_loads", "Model loads.", [*model, "device"],
                             registry=r)
        self.evictions = Counter("edgeserve:evictions", "Units evicted from a pool.",
                                 [*model, "kind"], registry=r)
        self.load_seconds = Histogram(
            "edgeserve:load_seconds", "Model load time, by the tier most bytes came from.",
            [*model, "tier"], buckets=LOAD_BUCKETS, registry=r)
        self.recent = Recent()      # the last minute, for the web page's numbers

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add gauges computed at scrape time."""
        self.registry.register(_Live(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def describe(self) -> Iterable[Metric]:
        return []


def gauge(name: str, doc: str, labels: list[str],
          samples: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


_PREWARM = (("prewarms", "prewarms", "Models prewarmed (loaded ahead of predicted demand)."),
            ("prewarm_hits", "hits", "Requests that found their model prewarmed."),
            ("prewarm_wasted", "wasted", "Prewarms whose predicted burst never came."),
            ("prewarm_cancelled", "cancelled", "Prewarms that yielded to a real request."))
_IDLE_HASHING = (("idle_hashed_files", "files", "Checkpoint files hashed in idle time."),
                 ("idle_hashed_bytes", "bytes", "Tensor bytes hashed in idle time."),
                 ("idle_hashing_yielded", "yielded",
                  "Times idle hashing stopped mid-file for a request or a load."))
_THREADS = (("cpu_threads", "threads", "Compute threads of CPU forwards now."),
            ("cpu_thread_changes", "changes", "Times the compute threads changed (auto)."))


def live_gauges(stats: dict[str, Any], queues: dict[str, tuple[int, int]]) -> list[Metric]:
    """Gauges from EdgeServer.stats() and the engine's per-model queue lengths."""
    pools = stats["devices"]
    by_model: list[tuple[list[str], float]] = []
    kv_usage: list[tuple[list[str], float]] = []
    kv_retained: list[tuple[list[str], float]] = []
    for device, pool in pools.items():
        # Retained prefix pages are reusable, not in use: they count as capacity.
        kv_capacity = pool["free_bytes"] + pool["bytes_by_kind"]["kv"]
        for model, kinds in pool["bytes_by_model"].items():
            for kind, nbytes in kinds.items():
                by_model.append(([device, kind, model], nbytes))
            kv = pool.get("kv", {}).get(model, {})
            if kv_capacity:
                kv_usage.append(([model], kv.get("running_bytes", 0) / kv_capacity))
            if kv:
                kv_retained.append(([device, model], kv["retained_bytes"]))
    experts = [(m, e) for p in pools.values() for m, info in p.get("models", {}).items()
               if (e := info.get("experts"))]
    prewarm = stats.get("prewarm") or {}
    hashing = stats.get("idle_hashing") or {}
    threads = stats.get("cpu_threads") or {}
    return [
        *(gauge(f"edgeserve:{name}", doc, [], [([], threads[key])] if threads.get(key) is not None
                else []) for name, key, doc in _THREADS),
        *(gauge(f"edgeserve:{name}", doc, [], [([], prewarm[key])] if key in prewarm else [])
          for name, key, doc in _PREWARM),
        *(gauge(f"edgeserve:{name}", doc, [], [([], hashing[key])] if key in hashing else [])
          for name, key, doc in _IDLE_HASHING),
        gauge("edgeserve:expert_hit_rate", "MoE expert cache hits / lookups.", ["model_name"],
              [([m], e["hit_rate"]) for m, e in experts]),
        gauge("edgeserve:expert_substitutions", "Misses served by a similar expert.",
              ["model_name"], [([m], e["substitutions"]) for m, e in experts]),
        gauge("edgeserve:expert_prefetch_accuracy", "Prefetched experts that were used.",
              ["model_name"], [([m], e["prefetch_accuracy"]) for m, e in experts]),
        gauge("edgeserve:expert_bytes_moved_per_token", "Expert bytes copied per token.",
              ["model_name"], [([m], e["bytes_moved_per_token"]) for m, e in experts]),
        gauge("vllm:num_requests_running", "Requests running.", ["model_name"],
              [([m], r) for m, (r, _) in queues.items()]),
        gauge("vllm:num_requests_waiting", "Requests waiting.", ["model_name"],
              [([m], w) for m, (_, w) in queues.items()]),
        gauge("vllm:kv_cache_usage_perc", "Share of the KV capacity in use (0..1).",
              ["model_name"], kv_usage),
        gauge("edgeserve:kv_retained_bytes", "Prefix KV pages kept for reuse.",
              ["device", "model_name"], kv_retained),
        gauge("edgeserve:pool_bytes", "Pool bytes in use by kind.", ["device", "kind"],
              [([d, k], v) for d, p in pools.items() for k, v in p["bytes_by_kind"].items()]),
        gauge("edgeserve:pool_capacity_bytes", "Pool size.", ["device"],
              [([d], p["total_bytes"]) for d, p in pools.items()]),
        gauge("edgeserve:pool_free_bytes", "Pool bytes free.", ["device"],
              [([d], p["free_bytes"]) for d, p in pools.items()]),
        gauge("edgeserve:model_pool_bytes", "Pool bytes by device, kind and model.",
              ["device", "kind", "model_name"], by_model),
    ]
