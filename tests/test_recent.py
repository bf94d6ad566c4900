from __future__ import annotations

import math

import pytest

from edgeserve.recent import Recent, percentile


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([5.0], 95) == 5.0
    assert math.isnan(percentile([], 50))


def test_figures_cover_the_last_minute_only() -> None:
    r = Recent(window=60.0)
    r.started = 0.0
    assert r.figures(now=30.0)["ttft_p50"] is None
    for i, ttft in enumerate([0.1, 0.2, 0.3, 0.4]):
        r.first_token(ttft, now=10.0 + i)
    r.tokens(100, now=10.2)
    r.tokens(50, now=10.7)          # the same second: one bucket
    r.tokens(30, now=40.0)
    f = r.figures(now=40.0)
    assert f["ttft_p50"] == pytest.approx(0.25) and f["requests"] == 4
    assert f["tokens_per_s"] == pytest.approx(180 / 40.0)    # since the start, under a minute
    f = r.figures(now=73.5)         # the first second's tokens and all TTFTs are older
    assert f["ttft_p50"] is None and f["requests"] == 0
    assert f["tokens_per_s"] == pytest.approx(30 / 60.0)
