"""The blocking facade: the same API as EdgeServer, from plain threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edgeserve.blocking import BlockingEdgeServer
from edgeserve.results import Completion, Delta
from edgeserve.sampling import SamplingError

MODEL = "demo-llama"
MESSAGES = [{"role": "user", "content": "hello"}]


def test_blocking_api(demo_store: Path) -> None:
    with BlockingEdgeServer(models=demo_store, device="cpu", pool_size="128MiB") as es:
        report = es.load(MODEL)
        assert report.bytes_total > 0
        out = es.chat(MODEL, MESSAGES, max_tokens=6, temperature=0)
        assert isinstance(out, Completion) and out.finish_reason == "length"
        deltas = list(es.stream_chat(MODEL, MESSAGES, max_tokens=6, temperature=0))
        assert all(isinstance(d, Delta) for d in deltas)
        assert "".join(d.text for d in deltas) == out.text
        assert deltas[-1].usage == out.usage
        again = es.complete(MODEL, out.token_ids[:3], max_tokens=2, temperature=0)
        assert again.usage.completion_tokens == 2
        assert "".join(map(str, es.stream_complete(MODEL, "def", max_tokens=3))) != ""
        stats = es.stats()
        assert stats["devices"]["cpu"]["resident_models"].keys() == {MODEL}
        assert stats["requests"] == {"running": 0, "waiting": 0}
        with pytest.raises(SamplingError):
            es.chat(MODEL, MESSAGES, temperature=-1)
        es.unload(MODEL)
        assert es.stats()["devices"]["cpu"]["resident_models"] == {}
    with pytest.raises(RuntimeError, match="closed"):
        es.chat(MODEL, MESSAGES)
    es.close()      # twice is fine


def test_leaving_a_stream_early_cancels_it(demo_store: Path) -> None:
    es = BlockingEdgeServer(models=demo_store, device="cpu", pool_size="128MiB")
    try:
        stream = es.stream_chat(MODEL, MESSAGES, max_tokens=1000)
        next(stream)
        stream.close()      # what `break` out of a for loop does
        assert es.stats()["requests"]["running"] + es.stats()["requests"]["waiting"] <= 1
        # The cancel takes effect at the next step; the next request does not wait for it.
        assert es.chat(MODEL, MESSAGES, max_tokens=2).usage.completion_tokens == 2
        assert es.stats()["requests"] == {"running": 0, "waiting": 0}
    finally:
        es.close()
    assert not any(t.name == "edgeserve-loop" for t in threading.enumerate())
