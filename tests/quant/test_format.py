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


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_error_is_at_most_half_a_stored_step_per_group(scheme: str) -> None:
    """Codes are the nearest for the float16 scale and minimum actually stored."""
    w = torch.randn(48, 128) * torch.logspace(-3, 1, 48)[:, None]
    q = quantize(scheme, w)
    assert q["qweight"].dtype == torch.uint8
    assert q["qweight"].shape == ((48, 128) if scheme == "int8" else (48, 64))
    assert q["scale"].dtype == q["min"].dtype == torch.float16
    assert q["scale"].shape == q["min"].shape == (48, 4)
    err = (dequantize(scheme, q) - w).abs().view(48, 4, 32)
    step = q["scale"].float()[..., None]
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all())
    # The stored grid covers each group: its minimum rounded down to float16, and
    # min + levels * scale at least the group's maximum.
    g = w.view(48, 4, 32)
    levels = 255 if scheme == "int8" else 15
    low = q["min"].float()
    assert bool((low <= g.amin(-1)).all())
    assert torch.allclose(low, g.amin(-1), rtol=2 ** -10, atol=0)
    assert bool((low + levels * q["scale"].float() >= g.amax(-1) * (1 - 1e-6)).all())


def test_int8_holds_more_than_int4_and_takes_1_125_bytes_a_weight() -> None:
    w = torch.randn(64, 256)
    e8 = float((dequantize("int8", quantize("int8", w)) - w).norm() / w.norm())
    e4 = float((dequantize("int4", quantize("int4", w)) - w).norm() / w.norm())
    assert e8 < 0.006 and e4 < 0.09 and e8 < e4 / 10        # 255 steps against 15
    assert QuantLayout("int8", (4096, 4096)).nbytes == 4096 * 4096 * 9 // 8
    assert QuantLayout("int4", (4096, 4096)).nbytes == 4096 * 4096 * 5 // 8


def test_tiny_and_constant_groups_keep_a_usable_scale() -> None:
    """Groups whose step is below float16's smallest normal, or zero, stay accurate."""
    w = torch.randn(3, 64)
    w[0] *= 1e-6                          # step ~1.6e-8: a float16 subnormal
    w[1, :32] = 0.3                       # a constant group
    w[2, :32] = 0.0
    for scheme in ("int8", "int4"):
        q = quantize(scheme, w)
        assert bool(torch.isfinite(q["scale"]).all()) and bool((q["scale"] >= 0).all())
        back = dequantize(scheme, q)
        assert float((back[0] - w[0]).abs().max()) < 2e-7
        assert float((back[1, :32] - 0.3).abs().max()) <= 0.3 * 2 ** -10
        assert torch.equal(back[2, :32], torch.zeros(32))


def test_values_beyond_float16_are_refused() -> None:
    with pytest.raises(ValueError, match="float16"):
        quantize("int8", torch.full((2, 32), 1e6))


def test_zero_rows_and_stacked_weights() -> None:
    w = torch.zeros(3, 8, 64)
    w[1] = torch.randn(8, 64)
    for scheme in ("int8", "int4"):
        q = quantize(scheme, w)
        back = dequantize(scheme, q)
        assert back.shape == w.shape
        assert torch.equal(back[0], w[0])
        assert (back - w).abs().max() < 0.5


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_schemes_need_groups_of_32(scheme: str) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(scheme, torch.randn(4, 40))


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
    (tmp_path / "quant.json").write_text(json.dumps({"format": 2, "scheme": "int8",
                                                     "tensors": {"a": "q5"}}))
    with pytest.raises(ModelFormatError, match="'a' has scheme 'q5'"):
        read_quant(tmp_path)
    # Format 1 (int8 per output channel, float32 scales) is named and refused.
    (tmp_path / "quant.json").write_text(json.dumps({"format": 1, "scheme": "int8",
                                                     "tensors": {"a": "int8"}}))
    with pytest.raises(ModelFormatError, match=r"quantized format 1, .* reads format 2"):
        read_quant(tmp_path)
    (tmp_path / "quant.json").write_text("{")
    with pytest.raises(ModelFormatError, match=r"quant\.json"):
        read_quant(tmp_path)
