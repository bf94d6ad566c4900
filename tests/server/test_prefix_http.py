"""Prefix reuse as HTTP clients see it: cached tokens through the openai SDK (streamed and
not), prompt_eval_count through the Ollama route, the prefix counters in /metrics."""

from __future__ import annotations

from typing import Any

import openai

from edgeserve.api import EdgeServer
from edgeserve.server import SERVER

MODEL = "demo-llama"
SYSTEM = " ".join(f"Rule {i}: answer briefly and cite the pool map." for i in range(60))


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def test_cached_tokens_through_the_openai_sdk(live_url: str, edge: EdgeServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none",
                                  max_retries=0) as client:
        first = await client.chat.completions.create(
            model=MODEL, messages=messages("What is a block?"),  # type: ignore[arg-type]
            max_tokens=4, temperature=0)
        assert first.usage is not None and first.usage.prompt_tokens_details is not None
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        page = edge.models[MODEL].kv.layout.page_tokens
        prompt = first.usage.prompt_tokens
        assert prompt > 3 * page

        second = await client.chat.completions.create(
            model=MODEL, messages=messages("What is a unit?"),  # type: ignore[arg-type]
            max_tokens=4, temperature=0)
        assert second.usage is not None and second.usage.prompt_tokens_details is not None
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached is not None and 0 < cached < second.usage.prompt_tokens
        assert cached % page == 0 and cached >= (prompt - 40) // page * page

        stream = await client.chat.completions.create(
            model=MODEL, messages=messages("What is a page?"),  # type: ignore[arg-type]
            max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True})
        usage = [c.usage async for c in stream if c.usage is not None]
        assert len(usage) == 1 and usage[0].prompt_tokens_details is not None
        assert usage[0].prompt_tokens_details.cached_tokens == cached


async def test_ollama_counts_the_tokens_evaluated(client: Any) -> None:
    body = {"model": MODEL, "messages": messages("Why pools?"), "stream": False,
            "options": {"temperature": 0, "num_predict": 3}}
    first = await (await client.post("/api/chat", json=body)).json()
    again = await (await client.post("/api/chat", json=body)).json()
    page = client.app[SERVER].models[MODEL].kv.layout.page_tokens
    # The same prompt again: every full page but the one holding its last token is found.
    assert first["prompt_eval_count"] > again["prompt_eval_count"]
    assert 1 <= again["prompt_eval_count"] <= page
    metrics = await (await client.get("/metrics")).text()
    hits = [line for line in metrics.splitlines()
            if line.startswith("vllm:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) == \
        first["prompt_eval_count"] - again["prompt_eval_count"]
