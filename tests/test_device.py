"""Device discovery and configuration parsing."""

from __future__ import annotations

import logging

import pytest
import torch

from edgeserve.config import format_size, from_env, parse_size
from edgeserve.device import discover


def test_cpu_is_always_available():
    (cpu,) = discover("cpu")
    assert cpu.name == "cpu" and not cpu.is_cuda and cpu.total_bytes > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_auto_falls_back_to_cpu_with_one_log_line(caplog):
    caplog.set_level(logging.INFO, logger="edgeserve.device")
    (device,) = discover("auto")
    assert device.name == "cpu"
    assert len(caplog.records) == 1 and "CPU" in caplog.records[0].getMessage()
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        discover("cuda:0")


def test_bad_device_spec():
    if torch.cuda.is_available():
        with pytest.raises(ValueError):
            discover("cuda:0,tpu")
    else:
        with pytest.raises(RuntimeError):
            discover("cuda:0,tpu")


@pytest.mark.parametrize(("text", "value"), [("2GiB", 2 << 30), ("512MiB", 512 << 20),
                                             ("1.5GB", 1_500_000_000), ("4096", 4096),
                                             ("64 KiB", 64 << 10)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "2XB", "-1GiB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_and_env(monkeypatch):
    assert format_size(3 << 30) == "3.00 GiB"
    monkeypatch.setenv("EDGESERVE_POOL_SIZE", "1GiB")
    monkeypatch.setenv("EDGESERVE_DEVICE", "cpu")
    cfg = from_env(models="elsewhere")
    assert cfg.pool.pool_size == 1 << 30 and cfg.device == "cpu"
    assert str(cfg.models) == "elsewhere"


def test_cpu_devices_are_separate_pools_by_name():
    devices = discover("cpu:0, cpu:1,cpu:2")
    assert [d.name for d in devices] == ["cpu:0", "cpu:1", "cpu:2"]
    assert not any(d.is_cuda for d in devices)
    with pytest.raises(ValueError, match="twice"):
        discover("cpu:0,cpu:0")


def test_pool_size_lists(monkeypatch):
    from edgeserve.config import PoolConfig, parse_sizes

    assert parse_sizes("1GiB") == 1 << 30
    assert parse_sizes("1GiB, 512MiB") == (1 << 30, 512 << 20)
    sizes = PoolConfig(pool_size=parse_sizes("1GiB,512MiB"))
    assert [sizes.size_for(i, 2) for i in (0, 1)] == [1 << 30, 512 << 20]
    assert PoolConfig(pool_size=1 << 20).size_for(1, 3) == 1 << 20
    with pytest.raises(ValueError, match="2 sizes for 3"):
        sizes.size_for(0, 3)
    monkeypatch.setenv("EDGESERVE_POOL_SIZE", "2GiB,1GiB")
    monkeypatch.setenv("EDGESERVE_PREWARM", "off")
    cfg = from_env()
    assert cfg.pool.pool_size == (2 << 30, 1 << 30) and not cfg.scheduler.prewarm


def test_cli_accepts_cpu_devices_size_lists_and_prewarm():
    from edgeserve.cli import build_parser
    from edgeserve.config import Config

    args = build_parser(Config()).parse_args(
        ["serve", "--device", "cpu:0,cpu:1", "--pool-size", "1GiB,2GiB", "--prewarm", "off"])
    assert (args.device, args.pool_size, args.prewarm) == ("cpu:0,cpu:1", "1GiB,2GiB", "off")
    with pytest.raises(SystemExit):
        build_parser(Config()).parse_args(["serve", "--pool-size", "1GiB,lots"])
