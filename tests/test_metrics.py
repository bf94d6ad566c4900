"""Prometheus metrics recorded by EdgeServer."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from edgeserve import EdgeServer


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_request_and_pool_metrics(tiny_store):
    async with EdgeServer(models=tiny_store, device="cpu", pool_size="64MiB",
                          block_size="4KiB") as es:
        await es.complete("llama", [1, 2, 3, 4], max_tokens=5, ignore_eos=True)
        await es.complete("llama", [5, 6], max_tokens=3, ignore_eos=True)
        got = samples(es.metrics.render().decode())
        model = (("model_name", "llama"),)
        assert got[("vllm:prompt_tokens_total", model)] == 6
        assert got[("vllm:generation_tokens_total", model)] == 8
        assert got[("vllm:time_to_first_token_seconds_count", model)] == 2
        assert got[("vllm:e2e_request_latency_seconds_count", model)] == 2
        assert got[("vllm:request_queue_time_seconds_count", model)] == 2
        assert got[("vllm:inter_token_latency_seconds_count", model)] == 6
        assert got[("vllm:request_success_total",
                    (("finished_reason", "length"), ("model_name", "llama")))] == 2
        loads = ("edgeserve:model_loads_total", (("device", "cpu"), ("model_name", "llama")))
        assert got[loads] == 1
        weights = es.pools["cpu"].bytes_by_kind()["weight"]
        assert got[("edgeserve:model_pool_bytes",
                    (("device", "cpu"), ("kind", "weight"), ("model_name", "llama")))] == weights
        # The two prompts share nothing, so nothing is found; the full pages they filled
        # are kept for reuse and counted as such, not as in use.
        assert got[("vllm:prefix_cache_queries_total", model)] == 6
        assert got[("vllm:prefix_cache_hits_total", model)] == 0
        retained = es.stats()["devices"]["cpu"]["kv"]["llama"]["retained_bytes"]
        assert got[("edgeserve:pool_bytes", (("device", "cpu"), ("kind", "kv")))] == retained
        assert got[("edgeserve:kv_retained_bytes", (("device", "cpu"), *model))] == retained
        assert got[("vllm:kv_cache_usage_perc", model)] == 0
