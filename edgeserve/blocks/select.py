"""Which blocks each task keeps: the largest changes within a block budget, aligned or not.

Legend: T = tasks, G = block positions over every packed weight (a position is a weight
and a block of it), e[t, g] = squared norm of task t's change at g (its energy).

Unaligned, each task keeps its own top-k blocks by energy, exact.

Aligned, tasks also draw on shared blocks. At a position where several tasks changed the
weight alike, one consensus block (their common value, or their mean) can stand for all of
them; a task that uses it loses r[t, g] = |its block - consensus|^2 of its change there
instead of nothing, but switching between tasks that share it moves nothing. A task may
use a shared block only if that loss is at most m[t], the energy of the largest block its
own budget already drops (so sharing never costs a task more than one more dropped block
would), and if the block is worth at least m[t] / 2 to it. With a budget that keeps every
changed block, m[t] = 0: only blocks equal to the consensus are shared, and packs are exact.
Candidates are then taken greedily by their total value over the tasks that take them, so
a block several tasks want goes to all of them at once: that is the alignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class SharedCandidate:
    position: int                 # g
    members: tuple[int, ...]      # tasks allowed to use it
    gains: tuple[float, ...]      # e - r of each member


@dataclass(slots=True)
class Selection:
    own: list[set[int]]                        # per task: positions kept exactly
    shared: list[set[int]] = field(default_factory=list)   # per task: consensus positions

    def count(self, task: int) -> int:
        return len(self.own[task]) + len(self.shared[task])


def budget_blocks(budget: float, total: int) -> int:
    """Blocks a task may hold: budget (a fraction) of the total, at least one if above 0."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget} must be in (0, 1]")
    return max(1, min(total, round(budget * total)))


def candidates(e: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(T, G) bool: positions a task changed, other than the pruned (zero) ones."""
    return (e > 0) & ~zero


def marginals(e: torch.Tensor, zero: torch.Tensor, k: int) -> torch.Tensor:
    """(T,) energy of the largest block each task's own top-k drops (0: it drops none)."""
    masked = torch.where(candidates(e, zero), e, torch.zeros_like(e))
    if k >= e.shape[1]:
        return torch.zeros(e.shape[0], dtype=e.dtype)
    return masked.topk(k + 1, dim=1).values[:, k]


def select_unaligned(e: torch.Tensor, zero: torch.Tensor, k: int) -> Selection:
    masked = torch.where(candidates(e, zero), e, torch.full_like(e, -1.0))
    top = masked.topk(min(k, e.shape[1]), dim=1)
    own = [{int(g) for g, v in zip(idx.tolist(), val.tolist(), strict=True) if v > 0}
           for idx, val in zip(top.indices, top.values, strict=True)]
    return Selection(own, [set() for _ in own])


def select_aligned(e: torch.Tensor, zero: torch.Tensor, k: int,
                   shared: list[SharedCandidate]) -> Selection:
    tasks = e.shape[0]
    # (value, order, task or -1, position or shared index): shared ones weigh all members.
    items: list[tuple[float, int, int, int]] = []
    for i, cand in enumerate(shared):
        items.append((sum(cand.gains), 0, -1, i))
    mask = candidates(e, zero)
    for t in range(tasks):
        positions = mask[t].nonzero().flatten().tolist()
        values = e[t, positions].tolist()
        items.extend((v, 1, t, g) for v, g in zip(values, positions, strict=True))
    items.sort(key=lambda item: (-item[0], item[1]))
    sel = Selection([set() for _ in range(tasks)], [set() for _ in range(tasks)])
    held: list[set[int]] = [set() for _ in range(tasks)]
    for _, _, task, index in items:
        if task >= 0:
            if len(held[task]) < k and index not in held[task]:
                sel.own[task].add(index)
                held[task].add(index)
            continue
        cand = shared[index]
        takers = [t for t in cand.members
                  if len(held[t]) < k and cand.position not in held[t]]
        if len(takers) < 2:            # a block for one task only: its own exact one is better
            continue
        for t in takers:
            sel.shared[t].add(cand.position)
            held[t].add(cand.position)
    return sel


def errors(e: torch.Tensor, zero: torch.Tensor, sel: Selection,
           residual: dict[tuple[int, int], float]) -> list[float]:
    """Per task: the squared norm of the change it loses (dropped blocks, shared residuals)."""
    out = []
    mask = candidates(e, zero)
    for t in range(e.shape[0]):
        kept = torch.tensor(sorted(sel.own[t] | sel.shared[t]), dtype=torch.long)
        lost = float(e[t][mask[t]].sum()) - float(e[t][kept].sum())
        lost += sum(residual.get((t, g), 0.0) for g in sel.shared[t])
        out.append(max(lost, 0.0))
    return out


def agree(ft: torch.Tensor, changed: torch.Tensor, e: torch.Tensor, limit: torch.Tensor,
           dtype: torch.dtype, block: tuple[int, int], first: int,
           shared: dict[int, torch.Tensor], residual: dict[tuple[int, int], float]
           ) -> list[SharedCandidate]:
    """Consensus blocks of positions first.. (ft (T, P, E) float64, e and changed (T, P))."""
    consensus, exact = seed(ft, changed)
    member = changed
    for _ in range(2):
        cons = consensus.to(dtype).to(torch.float64)
        r = (ft - cons).pow(2).sum(-1)                                   # (T, P)
        gain = e - r
        member = changed & (r <= limit) & (gain >= limit / 2)
        weights = member.to(torch.float64)
        mean = (ft * weights[..., None]).sum(0) / weights.sum(0).clamp(min=1)[:, None]
        consensus = torch.where(exact[:, None], consensus, mean)
    out = []
    for p in (member.sum(0) >= 2).nonzero().flatten().tolist():
        tasks = member[:, p].nonzero().flatten().tolist()
        pos = first + p
        out.append(SharedCandidate(pos, tuple(tasks), tuple(float(gain[t, p]) for t in tasks)))
        shared[pos] = cons[p].to(dtype).reshape(block)
        for t in tasks:
            residual[(t, pos)] = float(r[t, p])
    return out


def seed(ft: torch.Tensor, changed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First consensus per position: the value most tasks changed it to exactly, if two
    agree (exact, (P,) True), else the mean of the tasks that changed it."""
    tasks = ft.shape[0]
    agree = torch.zeros(changed.shape, dtype=torch.long)
    for s in range(tasks):
        for t in range(s + 1, tasks):
            eq = (ft[s] == ft[t]).all(-1) & changed[s] & changed[t]
            agree[s] += eq
            agree[t] += eq
    best, leader = agree.max(0)
    exact = best >= 1
    picked = ft[leader, torch.arange(ft.shape[1])].to(torch.float64)
    weights = changed.to(torch.float64)
    mean = (ft.to(torch.float64) * weights[..., None]).sum(0) / \
        weights.sum(0).clamp(min=1)[:, None]
    return torch.where(exact[:, None], picked, mean), exact
