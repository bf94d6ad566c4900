"""Embeddings through the openai SDK and the ollama client."""

from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np
import ollama
import openai
import pytest

from edgeserve.api import EdgeServer

MODEL = "demo-llama"
TEXTS = ["The cat sat on the mat.", "A much longer sentence about a completely different "
         "subject, with more tokens in it than the first.", "The cat sat on the mat."]


async def test_embeddings_with_the_sdk(live_url: str, edge: EdgeServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none",
                                  max_retries=0) as client:
        out = await client.embeddings.create(model=MODEL, input=TEXTS)
        size = edge.models[MODEL].spec.hidden_size
        vectors = np.array([d.embedding for d in out.data])
        assert vectors.shape == (3, size) and [d.index for d in out.data] == [0, 1, 2]
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert np.array_equal(vectors[0], vectors[2])               # equal inputs
        assert not np.allclose(vectors[0], vectors[1], atol=1e-2)
        # Batched or alone, and again: the same vectors.
        for i, text in enumerate(TEXTS):
            alone = await client.embeddings.create(model=MODEL, input=text)
            assert np.allclose(alone.data[0].embedding, vectors[i], atol=1e-5)
        again = await client.embeddings.create(model=MODEL, input=TEXTS)
        assert np.array_equal(np.array([d.embedding for d in again.data]), vectors)
        tokenizer = edge.tokenizer(MODEL)
        assert tokenizer is not None
        ids = tokenizer.encode(TEXTS[1])
        assert out.usage.prompt_tokens == 2 * len(tokenizer.encode(TEXTS[0])) + len(ids)
        by_ids = await client.embeddings.create(model=MODEL, input=[ids])
        assert np.allclose(by_ids.data[0].embedding, vectors[1], atol=1e-5)
        raw = await client.embeddings.create(model=MODEL, input=TEXTS[0],
                                             encoding_format="base64")
        decoded = raw.data[0].embedding
        if isinstance(decoded, str):
            decoded = np.frombuffer(base64.b64decode(decoded), dtype="<f4").tolist()
        assert np.allclose(decoded, vectors[0], atol=1e-6)
        same = await client.embeddings.create(model=MODEL, input="x", dimensions=size)
        assert len(same.data[0].embedding) == size
        for kwargs, param in [({"dimensions": 8}, "dimensions"), ({"input": []}, "input"),
                              ({"input": [[10**6]]}, "input")]:
            with pytest.raises(openai.BadRequestError) as bad:
                await client.embeddings.create(model=MODEL, **{"input": "x", **kwargs})
            assert bad.value.param == param
        assert edge.stats()["devices"]["cpu"]["bytes_by_kind"]["kv"] == 0     # none kept


async def test_embeddings_of_long_inputs_run_in_chunks(edge: EdgeServer) -> None:
    async with edge:
        await edge.load(MODEL)
        ids = list(range(10, 1500))
        whole = await edge.embed(MODEL, [ids])
        assert edge.engine is not None
        edge.engine.config = replace(edge.engine.config, prefill_chunk=256)
        chunked = await edge.embed(MODEL, [ids, ids[:300]])
        assert np.allclose(whole.vectors[0].numpy(), chunked.vectors[0].numpy(), atol=1e-4)


async def test_ollama_embed(live_url: str) -> None:
    client = ollama.AsyncClient(host=live_url)
    out = await client.embed(model=MODEL, input=TEXTS)
    assert len(out.embeddings) == 3 and out.embeddings[0] == out.embeddings[2]
    assert abs(np.linalg.norm(out.embeddings[1]) - 1) < 1e-5
    single = await client.embed(model=MODEL, input=TEXTS[1])
    assert np.allclose(single.embeddings[0], out.embeddings[1], atol=1e-5)
    legacy = await client.embeddings(model=MODEL, prompt=TEXTS[1])
    assert np.allclose(legacy.embedding, out.embeddings[1], atol=1e-5)
