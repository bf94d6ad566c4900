"""Functional similarity of the experts of one layer, from their weights.

Two experts are alike when their weight matrices point the same way: the cosine of the
flattened (gate_up, down) weights. Computed once per model and cached in the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def layer_similarity(experts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(E, E) cosine similarity of the experts of a layer; the diagonal is -inf (an expert
    never substitutes itself)."""
    flat = torch.stack([torch.cat((g.reshape(-1), d.reshape(-1))).float() for g, d in experts])
    flat = torch.nn.functional.normalize(flat, dim=1)
    sim = flat @ flat.T
    sim.fill_diagonal_(float("-inf"))
    return sim


def cached_similarity(cache: Path, key: str,
                      compute: Iterable[list[tuple[torch.Tensor, torch.Tensor]] | None]
                      | None = None) -> torch.Tensor | None:
    """(L, E, E) from the store's cache under key, computing and saving it when given the
    experts' weights per layer; None when neither is available. The layers are taken one at
    a time (a generator may make each layer's float weights only when its turn comes); a
    None layer has no experts, and no expert of it is similar to any (-inf)."""
    path = cache / ".edgeserve" / "similarity" / f"{key}.pt"
    if path.is_file():
        loaded: torch.Tensor = torch.load(path, weights_only=True)
        return loaded
    if compute is None:
        return None
    rows = [layer_similarity(layer) if layer is not None else None for layer in compute]
    size = next(r for r in rows if r is not None).shape
    sim = torch.stack([r if r is not None else torch.full(size, float("-inf")) for r in rows])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(sim, tmp)
        tmp.replace(path)
    except OSError:
        pass
    return sim
