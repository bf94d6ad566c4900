"""Choosing blocks: top-k per task, or aligned across tasks through shared blocks."""

from __future__ import annotations

import pytest
import torch

from edgeserve.blocks.select import (
    SharedCandidate,
    budget_blocks,
    errors,
    marginals,
    select_aligned,
    select_unaligned,
)


def test_budget_blocks():
    assert budget_blocks(0.1, 100) == 10
    assert budget_blocks(0.001, 100) == 1
    assert budget_blocks(1.0, 7) == 7
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            budget_blocks(bad, 10)


def test_unaligned_keeps_each_tasks_largest_changes():
    e = torch.tensor([[5.0, 0.0, 3.0, 1.0], [0.0, 2.0, 9.0, 4.0]], dtype=torch.float64)
    zero = torch.zeros_like(e, dtype=torch.bool)
    zero[0, 0] = True                       # pruned: exact for free, never in the budget
    sel = select_unaligned(e, zero, 2)
    assert sel.own == [{2, 3}, {2, 3}]
    assert marginals(e, zero, 2).tolist() == [0.0, 2.0]
    assert errors(e, zero, sel, {}) == [0.0, 2.0]


def test_aligned_takes_shared_blocks_for_all_members_at_once():
    # Both tasks changed position 0 alike (shared, loss 0.1 each); each has its own block.
    e = torch.tensor([[4.0, 3.0, 0.0], [4.0, 0.0, 3.5]], dtype=torch.float64)
    zero = torch.zeros_like(e, dtype=torch.bool)
    shared = [SharedCandidate(0, (0, 1), (3.9, 3.9))]
    sel = select_aligned(e, zero, 1, shared)
    assert sel.shared == [{0}, {0}] and sel.own == [set(), set()]
    assert errors(e, zero, sel, {(0, 0): 0.1, (1, 0): 0.1}) == pytest.approx([3.1, 3.6])


def test_a_shared_block_one_task_can_take_is_left_to_its_own_exact_block():
    e = torch.tensor([[4.0, 3.0], [1.0, 5.0]], dtype=torch.float64)
    zero = torch.zeros_like(e, dtype=torch.bool)
    shared = [SharedCandidate(0, (0, 1), (3.9, 0.9))]
    sel = select_aligned(e, zero, 1, shared)   # task 1's one slot goes to its position 1 first
    assert sel.own == [{0}, {1}] and sel.shared == [set(), set()]
