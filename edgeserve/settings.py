"""EdgeServer's settings: its keyword arguments over a Config, and each pool's size."""

from __future__ import annotations

from dataclasses import replace

from edgeserve.config import Config, PoolConfig, parse_size, parse_sizes, parse_threads
from edgeserve.device import DeviceInfo


def with_arguments(cfg: Config, *, pool_size: str | int | tuple[int, ...] | None,
                   block_size: str | int | None, host_size: str | int | None,
                   policy: str | None, expert_budget: float | None, expert_policy: str | None,
                   prefix_cache: bool | None, prewarm: bool | None,
                   idle_hashing: bool | None = None,
                   cpu_threads: str | int | None = None) -> Config:
    """cfg with the arguments that are not None applied."""
    if prewarm is not None:
        cfg = replace(cfg, scheduler=replace(cfg.scheduler, prewarm=prewarm))
    if idle_hashing is not None:
        cfg = replace(cfg, scheduler=replace(cfg.scheduler, idle_hashing=idle_hashing))
    if host_size is not None or policy is not None:
        cfg = replace(cfg, tiers=replace(
            cfg.tiers,
            host_size=parse_size(host_size) if host_size is not None else cfg.tiers.host_size,
            policy=policy or cfg.tiers.policy))
    if pool_size is not None or block_size is not None:
        cfg = replace(cfg, pool=replace(
            cfg.pool,
            pool_size=parse_sizes(pool_size) if pool_size is not None else cfg.pool.pool_size,
            block_size=(parse_size(block_size) if block_size is not None
                        else cfg.pool.block_size)))
    if expert_budget is not None or expert_policy is not None:
        cfg = replace(cfg, experts=replace(
            cfg.experts, budget=expert_budget if expert_budget is not None
            else cfg.experts.budget, policy=expert_policy or cfg.experts.policy))
    if prefix_cache is not None:
        cfg = replace(cfg, engine=replace(cfg.engine, prefix_cache=prefix_cache))
    if cpu_threads is not None:
        cfg = replace(cfg, engine=replace(cfg.engine, cpu_threads=parse_threads(cpu_threads)))
    return cfg


def pool_sizes(device: DeviceInfo, cfg: PoolConfig, index: int = 0, count: int = 1
               ) -> tuple[int, int]:
    block = cfg.block_size or (cfg.cuda_block_size if device.is_cuda else cfg.cpu_block_size)
    size = cfg.size_for(index, count)
    if size is None and device.is_cuda:
        size = int(device.free_bytes * cfg.cuda_fraction)
    elif size is None:      # CPU pools share the machine's memory: the budget is split
        size = min(cfg.cpu_cap, int(device.total_bytes * cfg.cpu_fraction)) // count
    return size, block
