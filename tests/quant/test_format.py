"""The quantized format: packing, quantization error bounds, quant.json."""

from __future__ import annotations

import json

import pytest
import torch

from edgeserve.arch.spec import ModelFormatError
from edgeserve.quant.format import (
    QuantInfo,
    dequantize,
    pack_int4,
    quantize,
    read_quant,
    unpack_int4,
)
from edgeserve.quant.layout import QuantLayout


def test_int4_packing_round_trips_and_puts_even_columns_low() -> None:
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_int4(packed), codes)


def test_int8_error_is_at_most_half_a_step_per_channel() -> None:
    w = torch.randn(48, 96) * torch.logspace(-2, 1, 48)[:, None]
    q = quantize("int8", w)
    assert q["qweight"].dtype == torch.int8 and q["scale"].shape == (48,)
    err = (dequantize("int8", q) - w).abs()
    assert bool((err <= q["scale"][:, None] / 2 + 1e-6).all())


def test_int4_error_is_at_most_half_a_step_per_group() -> None:
    w = torch.randn(16, 128)
    q = quantize("int4", w)
    assert q["qweight"].shape == (16, 64) and q["scale"].shape == (16, 4)
    err = (dequantize("int4", q) - w).abs().view(16, 4, 32)
    assert bool((err <= q["scale"][..., None] / 2 + 1e-6).all())
    # Group extremes are exact: min is the group's minimum, min + 15 scale its maximum.
    g = w.view(16, 4, 32)
    assert torch.allclose(q["min"], g.amin(-1))


def test_zero_rows_and_stacked_weights() -> None:
    w = torch.zeros(3, 8, 64)
    w[1] = torch.randn(8, 64)
    for scheme in ("int8", "int4"):
        q = quantize(scheme, w)
        back = dequantize(scheme, q)
        assert back.shape == w.shape
        assert torch.equal(back[0], w[0])
        assert (back - w).abs().max() < 0.5


def test_int4_needs_groups_of_32() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize("int4", torch.randn(4, 40))


def test_layout_views_share_the_units_bytes() -> None:
    layout = QuantLayout("int4", (10, 64))
    raw = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(raw)
    assert set(views) == {"qweight", "scale", "min"}
    q = quantize("int4", torch.randn(10, 64))
    for k, v in views.items():
        v.copy_(q[k])
    assert torch.equal(dequantize("int4", views), dequantize("int4", q))
    assert all(v.data_ptr() % 64 == raw.data_ptr() % 64 for v in views.values())


def test_quant_json_round_trip_and_errors(tmp_path) -> None:
    assert read_quant(tmp_path) is None
    info = QuantInfo("int8", {"a.weight": "int8"}, "test", {"a.weight": "h"})
    (tmp_path / "quant.json").write_text(info.to_json())
    assert read_quant(tmp_path) == info
    (tmp_path / "quant.json").write_text(json.dumps({"format": 1, "scheme": "int8",
                                                     "tensors": {"a": "q5"}}))
    with pytest.raises(ModelFormatError, match="'a' has scheme 'q5'"):
        read_quant(tmp_path)
    (tmp_path / "quant.json").write_text("{")
    with pytest.raises(ModelFormatError, match=r"quant\.json"):
        read_quant(tmp_path)
