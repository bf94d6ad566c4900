"""How close a quantized model stays to its float original: teacher-forced logits over
fixed token sequences, compared by top-1 agreement and mean KL divergence."""

from __future__ import annotations

from typing import NamedTuple

import torch

from edgeserve.batch import build_batch
from edgeserve.model import ResidentModel


class Agreement(NamedTuple):
    top1: float          # share of positions whose most likely next token is the teacher's
    kl: float            # mean KL(teacher || model) per position, in nats
    positions: int


def logits_of(model: ResidentModel, ids: list[int]) -> torch.Tensor:
    """(T, V) float32 next-token logits at every position of ids, in one prefill (call it
    where no step runs on the model's pool meanwhile)."""
    pages: list = []
    model.kv.grow(pages, len(ids))
    try:
        name = model.pool.device
        device = torch.device("cpu" if name.startswith("cpu") else name)
        batch = build_batch([(ids, 0, pages)], model.kv.layout.page_tokens, device)
        return model.forward(batch, all_logits=True)[0].float()
    finally:
        model.kv.release(pages)


def compare(teacher: torch.Tensor, student: torch.Tensor) -> Agreement:
    """teacher and student logits (..., V) at the same positions."""
    t, s = teacher.reshape(-1, teacher.shape[-1]), student.reshape(-1, student.shape[-1])
    top1 = float((t.argmax(-1) == s.argmax(-1)).float().mean())
    logp_t, logp_s = t.log_softmax(-1), s.log_softmax(-1)
    kl = float((logp_t.exp() * (logp_t - logp_s)).sum(-1).mean())
    return Agreement(top1, kl, int(t.shape[0]))


def agreement(teacher: ResidentModel, student: ResidentModel,
              prompts: list[list[int]]) -> Agreement:
    """Over every position of every prompt (teacher-forced: both read the same tokens)."""
    ref = torch.cat([logits_of(teacher, p) for p in prompts])
    out = torch.cat([logits_of(student, p) for p in prompts])
    return compare(ref, out)
