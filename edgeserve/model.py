"""A model resident on one device: its weight units, its KV pages, its forward pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from edgeserve.arch import Model, build_model
from edgeserve.arch.dense import Weight
from edgeserve.arch.spec import ModelSpec
from edgeserve.batch import StepBatch
from edgeserve.blocks.task import TaskBlocks
from edgeserve.kv import KVCache, KVLayout, kv_identity
from edgeserve.loader import LoadContext, LoadReport, abort, fill, prepare, read_spec, weight_views
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
    offload: Any = None             # experts.offload.ExpertOffload when experts are budgeted
    task: TaskBlocks | None = None  # a task of a base model: its blocks over these weights
    base: str | None = None         # that base model's id
    weights_key: str = ""           # of every weight unit it was loaded with (KV identity)
    schemes: dict[str, str] = field(default_factory=dict)   # quantized unit -> int8 / int4
    _runner: Model | None = field(default=None, repr=False)
    _views: dict[str, Weight] = field(default_factory=dict, repr=False)
    _epoch: int = -1

    @classmethod
    def load(cls, model_id: str, path: Path, ctx: LoadContext, report: LoadReport | None = None,
             spec: ModelSpec | None = None,
             progress: Callable[[int], None] | None = None) -> ResidentModel:
        """Load in one go on this thread (the scheduler splits prepare and fill instead)."""
        spec = spec or read_spec(path)
        report = report or LoadReport(model_id, ctx.pool.device)
        prepared = prepare(path, spec, ctx, model_id, report)
        ctx.pool.freeze()
        try:
            fill(prepared, ctx, progress)
        except BaseException:
            abort(prepared, ctx.pool)
            raise
        finally:
            ctx.pool.thaw()
        return cls.from_units(model_id, path, spec, ctx.pool, ctx.dtype, prepared.units,
                              prepared.schemes)

    @classmethod
    def from_units(cls, model_id: str, path: Path, spec: ModelSpec, pool: BlockPool,
                   dtype: torch.dtype, units: dict[str, Unit],
                   schemes: dict[str, str] | None = None) -> ResidentModel:
        kv = KVCache(pool, KVLayout.for_model(spec, dtype, pool.block_size), model_id)
        model = cls(model_id, path, spec, pool, dtype, units, kv, frozenset(spec.eos_token_ids),
                    schemes=dict(schemes or {}),
                    weights_key=kv_identity(f"{name}={unit.key or id(unit)}"
                                            for name, unit in sorted(units.items())))
        kv._identity = lambda: model.kv_identity
        return model

    @cached_property
    def kv_identity(self) -> str:
        """Everything that decides this model's KV values: prefix pages are shared only
        between models (and loads) with equal identities. Fixed once serving starts."""
        task = self.task.identity if self.task is not None else ""
        return kv_identity([repr(self.spec), str(self.dtype), repr(self.kv.layout),
                            self.weights_key, task])

    @property
    def substitutions(self) -> int:
        """Expert misses served by a substitute so far (their KV is not the model's)."""
        return self.offload.cache.stats.substitutions if self.offload is not None else 0

    @property
    def runner(self) -> Model:
        # Views go stale when the pool compacts; rebuild them then (cheap: no copies).
        if self._runner is None or self._epoch != self.pool.epoch:
            self._epoch = self.pool.epoch
            self._views = weight_views(self.pool, self.units, self.spec, self.dtype,
                                       self.schemes)
            self._runner = build_model(self.spec, self._views)
            if self.offload is not None:
                self.offload.attach(self._runner)
        return self._runner

    @property
    def views(self) -> dict[str, Weight]:
        """Views of the weight units the runner computes with (current after compaction)."""
        _ = self.runner
        return self._views

    @cached_property
    def batch_group(self) -> str:
        """Models whose sequences may share a forward: a base and its tasks."""
        return f"{self.base or self.id}|{self.pool.device}|{self.dtype}"

    def invalidate(self) -> None:
        """The weights changed: build the runner anew at the next forward."""
        self._runner = None

    def forward(self, batch: StepBatch, all_logits: bool = False,
                hidden: bool = False) -> torch.Tensor:
        """Logits (see arch), or with `hidden` the final-normed hidden states (B, S, D)."""
        runner = self.runner
        try:
            if hidden:
                return runner.hidden(batch, self.kv.view)
            return runner.forward(batch, self.kv.view, all_logits)
        finally:
            if self.offload is not None:
                with torch.inference_mode():
                    self.offload.end_forward()    # also when the forward failed midway

    @property
    def weight_bytes(self) -> int:
        return sum(u.nbytes for u in self.distinct_units)

    @property
    def resident_bytes(self) -> int:
        """Weight bytes held in the pool, whole blocks counted (experts on the device
        included when an expert cache holds them)."""
        experts = self.offload.resident_bytes if self.offload is not None else 0
        return sum(u.nblocks for u in self.distinct_units) * self.pool.block_size + experts

    @property
    def distinct_units(self) -> list[Unit]:
        return list({id(u): u for u in self.units.values()}.values())

    def release(self, retain: bool = True) -> None:
        """Stop using the weights. Retained units stay resident (and shared) until evicted;
        otherwise a unit no other model uses goes back to the pool at once."""
        if self.offload is not None:
            self.offload.release(retain)
            self.offload = None
        if self.task is not None:
            self.task.release()
        for unit in self.units.values():
            if not unit.alive:
                continue
            self.pool.unpin(unit)
            if not retain and unit.pins == 0:
                self.pool.release(unit)
        self.units.clear()
        self._runner = None
