"""Model code, one file per architecture family; knows nothing of HTTP, scheduling or tiers.

A family is a module `edgeserve.arch.<spec.family>` that provides `weight_plan(spec)` (the
pool units a model is made of) and `build(spec, weights)` returning a model with
`forward(batch, kv, all_logits)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol

import torch

from edgeserve.arch.dense import Weight
from edgeserve.arch.plan import WeightUnit
from edgeserve.arch.spec import ModelSpec
from edgeserve.batch import StepBatch


class Model(Protocol):
    def forward(self, batch: StepBatch, kv: torch.Tensor,
                all_logits: bool = False) -> torch.Tensor: ...

    def hidden(self, batch: StepBatch, kv: torch.Tensor) -> torch.Tensor: ...


def family(spec: ModelSpec) -> ModuleType:
    return importlib.import_module(f"edgeserve.arch.{spec.family}")


def weight_plan(spec: ModelSpec) -> dict[str, WeightUnit]:
    plan: dict[str, WeightUnit] = family(spec).weight_plan(spec)
    return plan


def build_model(spec: ModelSpec, weights: dict[str, Weight]) -> Model:
    model: Model = family(spec).build(spec, weights)
    return model


__all__ = ["Model", "WeightUnit", "build_model", "weight_plan"]
