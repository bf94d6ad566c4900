"""Every setting, as frozen dataclasses. Environment variables are read here and nowhere else."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4,
          "tb": 1000**4, "tib": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """'2GiB' -> 2147483648; plain integers are bytes."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {value!r} (examples: 512MiB, 2GiB, 1073741824)")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_switch(value: str, name: str) -> bool:
    """'on' / 'off' (also 1/0, true/false, yes/no)."""
    v = value.strip().lower()
    if v in ("on", "1", "true", "yes"):
        return True
    if v in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"{name} must be on or off, got {value!r}")


def parse_threads(value: str | int | None) -> int | None:
    """'auto' (or None) -> None: adapt; 'N' -> a fixed count of compute threads."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"cpu threads must be auto or a count, got {value!r}") from None
    if n < 1:
        raise ValueError(f"cpu threads must be auto or at least 1, got {value!r}")
    return n


def parse_sizes(value: str | int | tuple[int, ...]) -> int | tuple[int, ...]:
    """One size for every device ('2GiB') or one per device ('8GiB,4GiB')."""
    if isinstance(value, tuple):
        return tuple(parse_size(v) for v in value) if len(value) != 1 else parse_size(value[0])
    if isinstance(value, int) or "," not in value:
        return parse_size(value)
    return tuple(parse_size(part) for part in value.split(","))


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Sizing of the per-device block pool. None means: choose from the device."""

    pool_size: int | tuple[int, ...] | None = None   # one for all devices, or one each
    block_size: int | None = None
    # On the CPU the pool is a fixed budget: this share of physical memory, capped. Memory
    # is only touched as units fill it, so a generous budget costs nothing unused.
    cpu_fraction: float = 0.4
    cpu_cap: int = 64 << 30
    # On CUDA: this share of the free memory at start-up.
    cuda_fraction: float = 0.85
    cpu_block_size: int = 256 << 10
    cuda_block_size: int = 2 << 20

    def size_for(self, index: int, count: int) -> int | None:
        """The pool size of the index-th of count devices."""
        if not isinstance(self.pool_size, tuple):
            return self.pool_size
        if len(self.pool_size) != count:
            raise ValueError(f"--pool-size lists {len(self.pool_size)} sizes for {count} "
                             "device(s): give one size, or one per device")
        return self.pool_size[index]


PLACEMENTS = ("affinity", "most-free", "round-robin")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Placement across devices, predictive prewarming, and request grouping."""

    placement: str = "affinity"    # or the baselines: "most-free", "round-robin"
    prewarm: bool = True           # load models predicted to be asked for next, when idle
    group_wait: float = 5.0        # seconds a request may be passed over by grouping, at most
    step_seconds: float = 0.02     # estimated decode step time (the queued-work term)
    first_sight: bool = True       # hash a never-seen file while loading it (no second pass)
    idle_hashing: bool = True      # hash the store's never-hashed files in idle time

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of "
                             f"{', '.join(PLACEMENTS)}")
        if not self.group_wait >= 0:
            raise ValueError(f"group wait must be at least 0, got {self.group_wait}")


@dataclass(frozen=True, slots=True)
class TierConfig:
    """The host tier below the pools, the disk pipeline, and the eviction policy."""

    host_size: int | None = None   # None: an eighth of RAM, capped at 8 GiB
    readers: int | None = None     # disk reader threads; None: one per core, at most 4
    read_chunk: int = 32 << 20     # bytes per sequential read
    policy: str = "edgeserve"      # see edgeserve.eviction.POLICIES

    def __post_init__(self) -> None:
        if self.readers is not None and self.readers < 1:
            raise ValueError(f"readers must be at least 1, got {self.readers}")


# How a MoE model's experts are cached (see experts/cache.py).
EXPERT_POLICIES = ("lru", "importance", "importance+substitution")


@dataclass(frozen=True, slots=True)
class ExpertConfig:
    """MoE models: the share of experts kept on the device, and how the rest are served."""

    budget: float = 1.0            # 1.0: every expert resident
    policy: str = "importance+substitution"   # one of EXPERT_POLICIES
    threshold: float = 0.1         # gate weight below which a miss may be substituted
    prefetch: bool = True          # guess the next layer's experts from its router

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"expert budget must be in (0, 1], got {self.budget}")
        if self.policy not in EXPERT_POLICIES:
            raise ValueError(f"expert policy {self.policy!r} is not one of "
                             f"{', '.join(EXPERT_POLICIES)}")
        if not self.threshold >= 0:
            raise ValueError(f"expert threshold must be at least 0, got {self.threshold}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch: int = 64            # sequences decoded together in one step, per model
    max_queue: int = 1024          # waiting sequences before new requests are refused
    prefill_chunk: int = 2048      # prompt tokens prefilled in one forward
    batch_tasks: bool = True       # tasks of one base share forwards (else they take turns)
    batch_families: bool = True    # models sharing most weights share forwards (engine/families)
    prefix_cache: bool = True      # full KV pages kept under their prefix keys and reused
    cpu_threads: int | None = None  # the step thread's compute threads; None: auto (adapted)


@dataclass(frozen=True, slots=True)
class Config:
    models: Path = Path("models")
    device: str = "auto"
    dtype: str | None = None       # compute dtype; None: bf16 on CUDA, fp32 on CPU
    pool: PoolConfig = field(default_factory=PoolConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    quantize: str | None = None    # int8 | int4: the scheme of untagged model ids

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize must be int8 or int4, got {self.quantize!r}")


KERNEL_CACHE = Path.home() / ".cache" / "edgeserve" / "kernels"


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """The CPU matmul kernels (edgeserve/kernels/cpu): switch, build cache, C compiler."""

    enabled: bool = True           # EDGESERVE_CPU_KERNELS=off: torch's matmuls only
    cache: Path = KERNEL_CACHE
    cc: str = "cc"                 # CC: the compiler command (may carry arguments)


def kernel_config() -> KernelConfig:
    """The kernels' settings from EDGESERVE_CPU_KERNELS, EDGESERVE_CACHE and CC."""
    env = os.environ
    if "EDGESERVE_CACHE" in env:
        cache = Path(env["EDGESERVE_CACHE"]) / "kernels"
    else:
        base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else None
        cache = base / "edgeserve" / "kernels" if base else KERNEL_CACHE
    return KernelConfig(
        enabled=parse_switch(env.get("EDGESERVE_CPU_KERNELS", "on"), "EDGESERVE_CPU_KERNELS"),
        cache=cache, cc=env.get("CC") or "cc")


def from_env(**overrides: object) -> Config:
    """Defaults, then EDGESERVE_* variables, then explicit overrides (None means unset)."""
    env = os.environ
    pool = PoolConfig(
        pool_size=(parse_sizes(env["EDGESERVE_POOL_SIZE"])
                   if "EDGESERVE_POOL_SIZE" in env else None),
        block_size=(parse_size(env["EDGESERVE_BLOCK_SIZE"])
                    if "EDGESERVE_BLOCK_SIZE" in env else None),
    )
    tiers = TierConfig(
        host_size=parse_size(env["EDGESERVE_HOST_SIZE"]) if "EDGESERVE_HOST_SIZE" in env else None,
        policy=env.get("EDGESERVE_POLICY", "edgeserve"))
    cfg = Config(
        scheduler=SchedulerConfig(
            prewarm=parse_switch(env.get("EDGESERVE_PREWARM", "on"), "EDGESERVE_PREWARM"),
            idle_hashing=parse_switch(env.get("EDGESERVE_IDLE_HASHING", "on"),
                                      "EDGESERVE_IDLE_HASHING")),
        tiers=tiers,
        models=Path(env.get("EDGESERVE_MODELS", "models")),
        device=env.get("EDGESERVE_DEVICE", "auto"),
        dtype=env.get("EDGESERVE_DTYPE") or None,
        pool=pool,
        api_key=env.get("EDGESERVE_API_KEY") or None,
        quantize=env.get("EDGESERVE_QUANTIZE") or None,
    )
    if "EDGESERVE_PREFIX_CACHE" in env:
        cfg = replace(cfg, engine=replace(cfg.engine, prefix_cache=parse_switch(
            env["EDGESERVE_PREFIX_CACHE"], "EDGESERVE_PREFIX_CACHE")))
    if "EDGESERVE_CPU_THREADS" in env:
        cfg = replace(cfg, engine=replace(cfg.engine, cpu_threads=parse_threads(
            env["EDGESERVE_CPU_THREADS"])))
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "models" in changes:
        changes["models"] = Path(str(changes["models"]))
    return replace(cfg, **changes)  # type: ignore[arg-type]
