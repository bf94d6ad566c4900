"""Device discovery: CUDA through CuPy and NVML when usable, the CPU otherwise."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

log = logging.getLogger("edgeserve.device")
_CPU_RE = re.compile(r"^cpu:\d+$")


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    name: str            # "cpu" or "cuda:N"
    description: str     # e.g. "NVIDIA H100 80GB HBM3"
    total_bytes: int
    free_bytes: int

    @property
    def is_cuda(self) -> bool:
        return self.name.startswith("cuda")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.name)


def cpu_info(name: str = "cpu") -> DeviceInfo:
    """The CPU's memory; `name` may be cpu:N (several pools sharing the CPU)."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES") * page_size
        total = pages * page_size
    except (ValueError, OSError, AttributeError):
        total = avail = 8 << 30
    return DeviceInfo(name, f"CPU ({os.cpu_count()} cores)", total, avail)


def _cupy_device_count() -> int:
    """Number of CUDA devices CuPy can use, 0 when CuPy or a driver is missing."""
    try:
        import cupy

        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, CUDARuntimeError without a driver, ...
        return 0
    return n if torch.cuda.is_available() else 0


def _nvml_names() -> dict[int, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            names = {}
            for i in range(count):
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names[i] = name.decode() if isinstance(name, bytes) else str(name)
            return names
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return {}


def cuda_info(index: int) -> DeviceInfo:
    import cupy

    with cupy.cuda.Device(index):
        free, total = cupy.cuda.runtime.memGetInfo()
    name = _nvml_names().get(index) or torch.cuda.get_device_name(index)
    return DeviceInfo(f"cuda:{index}", name, int(total), int(free))


def discover(spec: str = "auto") -> list[DeviceInfo]:
    """Resolve 'auto' | 'cpu' | 'cuda' | a list like 'cuda:0,cuda:1' or 'cpu:0,cpu:1' to
    usable devices. Each cpu:N is a pool of its own on the CPU: placement across devices
    then runs anywhere, exactly as across CUDA devices."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return [cpu_info()]
    parts = [part.strip() for part in spec.split(",")]
    if len(set(parts)) < len(parts):
        raise ValueError(f"--device {spec}: a device is named twice")
    if all(_CPU_RE.match(part) for part in parts):
        return [cpu_info(part) for part in parts]
    count = _cupy_device_count()
    if spec == "auto":
        if count == 0:
            log.info("device auto: no usable CUDA device (CuPy/driver missing), using the CPU")
            return [cpu_info()]
        log.info("device auto: using cuda:0 of %d CUDA device(s)", count)
        return [cuda_info(0)]
    if count == 0:
        raise RuntimeError(f"--device {spec}: no usable CUDA device (is CuPy installed?)")
    if spec == "cuda":
        return [cuda_info(0)]
    devices = []
    for part in parts:
        if not part.startswith("cuda:") or not part[5:].isdigit():
            raise ValueError(f"--device: {part!r} is not cpu, cpu:N, auto, cuda or cuda:N")
        index = int(part[5:])
        if index >= count:
            raise RuntimeError(f"--device: {part} does not exist ({count} CUDA device(s))")
        devices.append(cuda_info(index))
    return devices
