"""How sequences become forwards and sampled rows: prefill batches of similar length within
the token budget, log-probabilities for the rows that ask for them, and the forwards a
queue still needs (and its sequences per model)."""

from __future__ import annotations

import torch

from edgeserve.results import TokenLogprob
from edgeserve.sampling import token_logprobs
from edgeserve.sequence import Sequence


def row_logprobs(logits: torch.Tensor, picked: torch.Tensor,
              wanted: list[int | None]) -> dict[int, TokenLogprob]:
    """Row -> log-probability of its token, for the rows that asked for them."""
    rows = [j for j, n in enumerate(wanted) if n is not None]
    if not rows:
        return {}
    top = max(wanted[j] or 0 for j in rows)
    index = torch.tensor(rows, device=logits.device)
    chosen, tops = token_logprobs(logits[index], picked[index], top)
    return {j: TokenLogprob(int(picked[j]), chosen[k], tops[k][:wanted[j] or 0])
            for k, j in enumerate(rows)}


def prefill_groups(seqs: list[Sequence], budget: int) -> list[list[Sequence]]:
    """Batches of similar length whose padded size stays within `budget` tokens."""
    groups: list[list[Sequence]] = []
    real = 0
    for seq in sorted(seqs, key=lambda s: s.length - s.cached):
        n = min(budget, seq.length - seq.cached)
        group = groups[-1] if groups else None
        # Sorted by length, so n is the widest row: padding = rows * n - real tokens.
        if group and (len(group) + 1) * n <= budget and (len(group) + 1) * n <= 1.5 * (real + n):
            group.append(seq)
            real += n
        else:
            groups.append([seq])
            real = n
    return groups



def queued_steps(seqs: list[Sequence], chunk: int) -> dict[str, int]:
    """Device -> forwards the sequences still need (per model, the longest)."""
    longest: dict[int, tuple[str, int]] = {}
    for seq in seqs:
        left = seq.params.max_tokens - seq.sampled + -(-(seq.length - seq.cached) // chunk)
        device, most = longest.get(id(seq.model), (seq.model.pool.device, 0))
        longest[id(seq.model)] = (device, max(most, left))
    out: dict[str, int] = {}
    for device, steps in longest.values():
        out[device] = out.get(device, 0) + steps
    return out


def counts_by_model(running: list[Sequence], waiting: list[Sequence]
                    ) -> dict[str, tuple[int, int]]:
    """model id -> (running, waiting)."""
    out: dict[str, tuple[int, int]] = {}
    for seq in running:
        r, w = out.get(seq.model.id, (0, 0))
        out[seq.model.id] = (r + 1, w)
    for seq in waiting:
        r, w = out.get(seq.model.id, (0, 0))
        out[seq.model.id] = (r, w + 1)
    return out
