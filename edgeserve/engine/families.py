"""Forwards shared by models that share most of their weights: a base and its fine-tunes.

Fine-tunes served beside their base (merged adapters, task fine-tunes with the embedding
frozen) hold most of their bytes in units equal to the base's, and on one pool those are
the same units. Their sequences then run in one forward over a leader's weights: at each
unit where a member's weights differ, its rows are computed anew with its own unit

    y[rows] = x[rows] @ W_member^T + b_member        (linears; norms and embeddings alike)

through the model's delta hooks (see batch.StepBatch.delta). The weights shared are read
once per step for all of them instead of once per model, and every model's rows still
compute with exactly its own weights (the units compared are content-addressed). Models
join a family only when at least SHARE of their weight bytes are the leader's units, on the
same pool, with the same architecture, dtype and KV layout; models with tasks or an expert
cache keep their own groups (their forwards need hooks of their own).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from edgeserve.arch import dense
from edgeserve.arch.dense import rms_norm
from edgeserve.blocks.delta import task_delta

if TYPE_CHECKING:
    from edgeserve.batch import Delta
    from edgeserve.model import ResidentModel
    from edgeserve.quant.linear import QWeight
    from edgeserve.sequence import Sequence as Seq

SHARE = 0.5             # the least share of a member's weight bytes that is the leader's
_CACHE_SIZE = 1024
# (leader weights key, member weights key) -> (bytes shared / member bytes, unit names
# whose content differs): content-keyed, so it never goes stale.
_diffs: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}


def step_groups(models: Iterable[ResidentModel], batch_tasks: bool,
                families: bool) -> list[set[int]]:
    """The models with work this step, grouped into forwards (sets of id(model)): a base and
    its tasks together (batch_tasks), and with families, models sharing most weights."""
    groups: dict[str, list[ResidentModel]] = {}
    for model in models:
        key = model.batch_group if batch_tasks else str(id(model))
        group = groups.setdefault(key, [])
        if all(m is not model for m in group):
            group.append(model)
    merged: list[list[ResidentModel]] = []
    for group in groups.values():
        home = next((f for f in merged if families and _joins(f[0], group)), None)
        if home is None:
            merged.append(list(group))
        else:
            home.extend(group)
    return [{id(m) for m in group} for group in merged]


def _joins(leader: ResidentModel, group: list[ResidentModel]) -> bool:
    if not _plain(leader):
        return False
    for model in group:
        if not _plain(model) or not _compatible(leader, model):
            return False
        share, _ = differing(leader, model)
        if share < SHARE:
            return False
    return True


def _plain(model: ResidentModel) -> bool:
    return model.task is None and model.offload is None and model.spec.family == "dense"


def _compatible(a: ResidentModel, b: ResidentModel) -> bool:
    return (a.pool is b.pool and a.dtype == b.dtype and a.spec == b.spec
            and a.kv.layout == b.kv.layout and a.schemes == b.schemes)


def differing(leader: ResidentModel, member: ResidentModel) -> tuple[float, frozenset[str]]:
    """The share of member's weight bytes held in units equal to leader's, and the names of
    member's units whose content differs from leader's."""
    key = (leader.weights_key, member.weights_key)
    found = _diffs.get(key)
    if found is None:
        shared, total, names = 0, 0, set()
        for name, unit in member.units.items():
            other = leader.units.get(name)
            total += unit.nbytes
            if other is not None and unit.key is not None and other.key == unit.key:
                shared += unit.nbytes
            else:
                names.add(name)
        found = (shared / max(total, 1), frozenset(names))
        if len(_diffs) >= _CACHE_SIZE:
            _diffs.clear()
        _diffs[key] = found
    return found


def forward_delta(seqs: Sequence[Seq]) -> Delta | None:
    """The per-row changes of one forward over seqs[0].model's weights: task blocks, or
    the units where members of its family differ."""
    leader = seqs[0].model
    if any(s.model.task is not None for s in seqs) or all(s.model is leader for s in seqs):
        return task_delta([s.model.task for s in seqs])
    device = torch.device(leader.pool.device)
    members: dict[int, tuple[ResidentModel, list[int]]] = {}
    for i, seq in enumerate(seqs):
        if seq.model is not leader:
            members.setdefault(id(seq.model), (seq.model, []))[1].append(i)
    parts = []
    for model, rows in members.values():
        _, names = differing(leader, model)
        if names:
            views = model.views
            parts.append((torch.tensor(rows, dtype=torch.int64, device=device),
                          {n: views[n] for n in names}))
    return FamilyDelta(parts) if parts else None


class FamilyDelta:
    """Rows of family members recomputed with their own units where those differ."""

    def __init__(self, parts: list[tuple[torch.Tensor, dict[str, torch.Tensor | QWeight]]]
                 ) -> None:
        self.parts = parts          # (batch rows, member's views of its differing units)

    def linear(self, unit: str, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | QWeight,
               b: torch.Tensor | None) -> torch.Tensor:
        bias = unit.removesuffix("weight") + "bias"
        for rows, views in self.parts:
            if unit in views or bias in views:
                own_b = views.get(bias, b)
                y = y.index_copy(0, rows, dense.matmul(x[rows], views.get(unit, w),
                                                       own_b if own_b is None else _float(own_b)))
        return y

    def norm(self, unit: str, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        for rows, views in self.parts:
            if unit in views:
                y = y.index_copy(0, rows, rms_norm(x[rows], _float(views[unit]), eps))
        return y

    def embed(self, unit: str, tokens: torch.Tensor, x: torch.Tensor,
              vocab: int) -> torch.Tensor:
        for rows, views in self.parts:
            if unit in views:
                x = x.index_copy(0, rows, dense.embedding(tokens[rows], views[unit], x.dtype))
        return x


def _float(t: torch.Tensor | QWeight) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError("a quantized bias or norm weight")
    return t
