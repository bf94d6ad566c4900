"""Per-expert routing statistics: gate-weight mass and frequency, decayed over time.

Legend: N = tokens, A = active experts per token, L = layers, E = experts per layer.
"""

from __future__ import annotations

import torch


class ExpertImportance:
    def __init__(self, layers: int, experts: int, decay: float = 0.98,
                 mass_weight: float = 0.5) -> None:
        self.decay, self.mass_weight = decay, mass_weight
        self.mass = torch.zeros(layers, experts, dtype=torch.float64)    # (L, E)
        self.count = torch.zeros(layers, experts, dtype=torch.float64)   # (L, E)

    def observe(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """One routing decision of a layer: ids (N, A) experts, weights (N, A) gate weights."""
        experts = self.mass.shape[1]
        flat = ids.reshape(-1).to("cpu", torch.int64)
        self.mass[layer] *= self.decay
        self.count[layer] *= self.decay
        self.mass[layer] += torch.bincount(flat, weights.reshape(-1).to("cpu", torch.float64),
                                           minlength=experts)
        self.count[layer] += torch.bincount(flat, minlength=experts).to(torch.float64)

    def scores(self, layer: int) -> torch.Tensor:
        """(E,) importance: a blend of the layer's normalised gate mass and frequency."""
        return self._blend(self.mass[layer], self.count[layer])

    def demand(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(E,) the same blend for one routing alone (ids, weights (N, A)): what it asks of
        each expert, on the scale of scores()."""
        experts = self.mass.shape[1]
        flat = ids.reshape(-1).to("cpu", torch.int64)
        mass = torch.bincount(flat, weights.reshape(-1).to("cpu", torch.float64),
                              minlength=experts)
        return self._blend(mass, torch.bincount(flat, minlength=experts).to(torch.float64))

    def _blend(self, mass: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Over the last dim (experts): each normalised to sum 1 (0 stays 0), then blended."""
        mass = mass / mass.sum(-1, keepdim=True).clamp(min=1e-300)
        count = count / count.sum(-1, keepdim=True).clamp(min=1e-300)
        return self.mass_weight * mass + (1 - self.mass_weight) * count

    def score(self, layer: int, expert: int) -> float:
        return float(self.scores(layer)[expert])

    def table(self) -> list[list[float]]:
        """[layer][expert] importance of every expert at once (one computation)."""
        return self._blend(self.mass, self.count).tolist()
