"""A model resident on one device: its weight units, its KV pages, its forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeserve.arch.dense import DenseModel
from edgeserve.arch.spec import ModelSpec
from edgeserve.batch import StepBatch
from edgeserve.kv import KVCache, KVLayout
from edgeserve.loader import LoadReport, load_weights, read_spec, weight_views
from edgeserve.pool import BlockPool, Unit


@dataclass(eq=False)
class ResidentModel:
    id: str
    path: Path
    spec: ModelSpec
    pool: BlockPool
    dtype: torch.dtype
    units: dict[str, Unit]
    kv: KVCache
    eos_token_ids: frozenset[int] = frozenset()
    _runner: DenseModel | None = field(default=None, repr=False)
    _epoch: int = -1

    @classmethod
    def load(cls, model_id: str, path: Path, pool: BlockPool, dtype: torch.dtype,
             report: LoadReport | None = None, spec: ModelSpec | None = None) -> ResidentModel:
        spec = spec or read_spec(path)
        report = report or LoadReport(model_id, pool.device)
        units = load_weights(path, spec, pool, dtype, model_id, report)
        kv = KVCache(pool, KVLayout.for_model(spec, dtype, pool.block_size), model_id)
        return cls(model_id, path, spec, pool, dtype, units, kv, frozenset(spec.eos_token_ids))

    @property
    def runner(self) -> DenseModel:
        # Views go stale when the pool compacts; rebuild them then (cheap: no copies).
        if self._runner is None or self._epoch != self.pool.epoch:
            self._epoch = self.pool.epoch
            self._runner = DenseModel(self.spec, weight_views(self.pool, self.units, self.spec,
                                                              self.dtype))
        return self._runner

    def forward(self, batch: StepBatch, all_logits: bool = False) -> torch.Tensor:
        runner = self.runner
        return runner.forward(batch, self.kv.view, all_logits)

    @property
    def weight_bytes(self) -> int:
        return sum(u.nbytes for u in self.units.values())

    @property
    def resident_bytes(self) -> int:
        """Weight bytes held in the pool, whole blocks counted."""
        return sum(u.nblocks for u in self.units.values()) * self.pool.block_size

    def release(self) -> None:
        """Give the weights back to the pool (KV pages belong to sequences)."""
        for unit in self.units.values():
            self.pool.release(unit)
        self.units.clear()
        self._runner = None
