"""One request's latencies recorded in the metrics as its events arrive."""

from __future__ import annotations

import time

from edgeserve.metrics import Metrics
from edgeserve.sequence import Event
from edgeserve.sequence import Sequence as Seq


class RequestTimer:
    """Records one request's latencies in the metrics as its events arrive."""

    def __init__(self, metrics: Metrics, model_id: str, seq: Seq) -> None:
        self.metrics, self.model, self.seq = metrics, model_id, seq
        self.last: float | None = None

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        if n == 0:
            return
        self.metrics.recent.tokens(n, now)
        if self.last is None:
            self.metrics.ttft.labels(self.model).observe(now - self.seq.arrival)
            self.metrics.recent.first_token(now - self.seq.arrival, now)
        else:
            self.metrics.itl.labels(self.model).observe((now - self.last) / n)
        self.last = now

    def finish(self, event: Event) -> None:
        m, seq = self.metrics, self.seq
        m.e2e.labels(self.model).observe(time.monotonic() - seq.arrival)
        if seq.started_at is not None:
            m.queue.labels(self.model).observe(seq.started_at - seq.arrival)
        m.prompt_tokens.labels(self.model).inc(event.prompt_tokens)
        if seq.prefix.queried:
            m.prefix_queries.labels(self.model).inc(event.prompt_tokens)
            m.prefix_hits.labels(self.model).inc(event.cached_tokens)
        m.generation_tokens.labels(self.model).inc(event.completion_tokens)
        m.requests.labels(self.model, event.finish_reason or "").inc()
