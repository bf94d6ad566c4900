"""Embeddings from any served model's hidden states.

Pooling: the mean of the final-normed hidden states of every input token (the BOS the
tokenizer adds included), L2-normalised. Inputs run on the engine's step thread between
steps, several per forward (similar lengths together, at most `prefill_chunk` padded
tokens); a long input runs in chunks over temporary KV pages. No KV is kept: the pages go
back to the pool as soon as the batch is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from edgeserve.batch import build_batch
from edgeserve.model import ResidentModel
from edgeserve.pool import Unit
from edgeserve.results import InvalidRequest

if TYPE_CHECKING:
    from edgeserve.api import EdgeServer


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: torch.Tensor       # (N, D) float32, rows of norm 1
    prompt_tokens: int          # tokens of every input together


async def embed(server: EdgeServer, model_id: str, inputs: Sequence[str | Sequence[int]],
                truncate: bool = False) -> Embeddings:
    """One vector per input (a text or token ids); `truncate` cuts inputs longer than the
    context instead of refusing them."""
    if not inputs:
        raise InvalidRequest("input must hold at least one text or token list", "input")
    await server.load(model_id)
    server.scheduler.request_started(model_id)
    try:
        model = server.models[model_id]
        ids = await asyncio.to_thread(_token_ids, server, model, inputs, truncate)
        engine = server.engine
        if engine is None:
            raise RuntimeError("EdgeServer is not started")
        vectors = await engine.run(embed_tokens, model, ids, engine.config.prefill_chunk)
        return Embeddings(vectors, sum(len(i) for i in ids))
    finally:
        server.scheduler.request_ended(model_id)


def _token_ids(server: EdgeServer, model: ResidentModel, inputs: Sequence[str | Sequence[int]],
               truncate: bool) -> list[list[int]]:
    limit, vocab = model.spec.max_positions, model.spec.vocab_size
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            tokenizer = server.tokenizer(model.id)
            if tokenizer is None:
                raise InvalidRequest(f"model '{model.id}' has no tokenizer: send token ids",
                                     "input")
            ids = tokenizer.encode(item)
        else:
            ids = [int(t) for t in item]
        if not ids:
            raise InvalidRequest(f"input {i} is empty", "input")
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"input {i} has a token id outside 0..{vocab - 1}", "input")
        if len(ids) > limit:
            if not truncate:
                raise InvalidRequest(f"input {i} has {len(ids)} tokens; model '{model.id}' "
                                     f"takes at most {limit}", "input")
            ids = ids[:limit]
        out.append(ids)
    return out


def embed_tokens(model: ResidentModel, inputs: list[list[int]], budget: int) -> torch.Tensor:
    """On the step thread: the pooled, normalised vectors (N, D) of inputs."""
    out = torch.empty(len(inputs), model.spec.hidden_size, dtype=torch.float32)
    for rows in _groups(inputs, budget):
        out[rows] = _embed_group(model, [inputs[r] for r in rows], budget)
    return torch.nn.functional.normalize(out, dim=-1)


def _groups(inputs: list[list[int]], budget: int) -> list[list[int]]:
    """Row indices batched by similar length, rows x the longest within budget."""
    groups: list[list[int]] = []
    for r in sorted(range(len(inputs)), key=lambda r: len(inputs[r])):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * min(len(inputs[r]), budget) <= budget:
            group.append(r)
        else:
            groups.append([r])
    return groups


def _embed_group(model: ResidentModel, inputs: list[list[int]], budget: int) -> torch.Tensor:
    """Mean hidden state of each input (G, D), computed chunk by chunk over KV pages."""
    device = torch.device(model.pool.device)
    sums = torch.zeros(len(inputs), model.spec.hidden_size, dtype=torch.float32, device=device)
    pages: list[list[Unit]] = [[] for _ in inputs]
    width = max(1, budget // len(inputs))
    try:
        for start in range(0, max(len(i) for i in inputs), width):
            rows = [r for r, ids in enumerate(inputs) if start < len(ids)]
            for r in rows:
                model.kv.grow(pages[r], min(len(inputs[r]), start + width))
            batch = build_batch([(inputs[r][start:start + width], start, pages[r]) for r in rows],
                                model.kv.layout.page_tokens, device)
            hidden = model.forward(batch, hidden=True).float()        # (R, S, D)
            sums[rows] += (hidden * batch.valid[:, :, None]).sum(dim=1)
    finally:
        for p in pages:
            model.kv.release(p)
    lengths = torch.tensor([len(i) for i in inputs], dtype=torch.float32, device=device)
    return (sums / lengths[:, None]).cpu()
