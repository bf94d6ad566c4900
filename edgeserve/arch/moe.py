"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (shared expert), OLMoE, Qwen3-MoE.

Norms, attention and the decoder loop are the dense family's. A sparse layer's feed-forward
is a router that picks A of E experts per token, each a SiLU-gated MLP, the token's output
being the gate-weighted sum of its experts' outputs (plus Qwen2-MoE's shared expert).
Qwen-MoE layers in mlp_only_layers, or off decoder_sparse_step, keep a dense MLP.

Legend: N = tokens, E = experts, A = active experts per token, D = hidden,
I = expert intermediate, S = shared expert intermediate.

Units of sparse layer l (kinds in brackets; the expert cache keeps a subset of `expert`s):
    model.layers.{l}.mlp.gate.weight                        (E, D)   router [weight]
    model.layers.{l}.mlp.experts.{e}.gate_up_proj.weight    (2I, D)  [expert]
    model.layers.{l}.mlp.experts.{e}.down_proj.weight       (D, I)   [expert]
    model.layers.{l}.mlp.shared_expert.gate_up_proj.weight  (2S, D)  Qwen2-MoE [weight]
    model.layers.{l}.mlp.shared_expert.down_proj.weight     (D, S)   Qwen2-MoE [weight]
    model.layers.{l}.mlp.shared_expert_gate.weight          (1, D)   Qwen2-MoE [weight]
The checkpoint tensors they are made of depend on its layout:
    per_expert  what save_pretrained writes (and hub checkpoints hold): one tensor per expert,
                experts.{e}.{gate,up,down}_proj.weight; Mixtral's
                block_sparse_moe.{gate, experts.{e}.w1 (gate), w3 (up), w2 (down)}.weight
    stacked     save_pretrained(save_original_format=False): experts.gate_up_proj (E, 2I, D)
                and experts.down_proj (E, D, I). A unit is made of whole tensors, so these
                become one expert unit each per layer (named as the tensor), not one per expert.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from edgeserve.arch.dense import DenseModel, Mlp, Weight, floats, matmul, mlp
from edgeserve.arch.plan import WeightUnit, attention_plan, base_plan, fused, mlp_plan, one
from edgeserve.arch.spec import ModelSpec
from edgeserve.batch import StepBatch
from edgeserve.pool import UnitKind

ExpertWeights = tuple[Weight, Weight]                  # gate_up (2I, D), down (D, I)
ExpertLookup = Callable[[int, int], ExpertWeights]      # (layer, expert) -> its weights
EXPERT = UnitKind.EXPERT


def weight_plan(spec: ModelSpec) -> dict[str, WeightUnit]:
    plan = base_plan(spec)
    for n in range(spec.num_layers):
        plan |= attention_plan(spec, n)
        if spec.sparse_layers[n]:
            plan |= _sparse_plan(spec, n)
        else:
            plan |= mlp_plan(f"model.layers.{n}.mlp.", spec.hidden_size,
                             spec.intermediate_size, spec.mlp_bias)
    return plan


def _sparse_plan(spec: ModelSpec, n: int) -> dict[str, WeightUnit]:
    d, i, e_count = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts
    p = f"model.layers.{n}.mlp."
    mixtral = spec.architecture == "MixtralForCausalLM" and spec.expert_layout == "per_expert"
    src = f"model.layers.{n}.block_sparse_moe." if mixtral else p    # checkpoint names
    plan = {p + "gate.weight": WeightUnit((e_count, d), (src + "gate.weight",), (e_count,))}
    if spec.expert_layout == "stacked":
        plan |= {p + "experts.gate_up_proj": one(p + "experts.gate_up_proj", e_count, 2 * i, d,
                                                 kind=EXPERT),
                 p + "experts.down_proj": one(p + "experts.down_proj", e_count, d, i,
                                              kind=EXPERT)}
    else:
        gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for e in range(e_count):
            x = f"{src}experts.{e}."
            plan[f"{p}experts.{e}.gate_up_proj.weight"] = fused(
                {f"{x}{gate}.weight": i, f"{x}{up}.weight": i}, d, kind=EXPERT)
            plan[f"{p}experts.{e}.down_proj.weight"] = WeightUnit(
                (d, i), (f"{x}{down}.weight",), (d,), EXPERT)
    if spec.shared_expert_intermediate_size:
        plan |= mlp_plan(p + "shared_expert.", d, spec.shared_expert_intermediate_size, False)
        plan[p + "shared_expert_gate.weight"] = one(p + "shared_expert_gate.weight", 1, d)
    return plan


def route(h: torch.Tensor, router: torch.Tensor, top_k: int,
          normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts each token goes to: h (N, D), router (E, D) -> expert ids (N, A) and
    their gate weights (N, A) in float32: softmax over all E, the top A kept, rescaled to
    sum to 1 when normalize (which equals a softmax over the A selected logits)."""
    probs = F.linear(h, router).float().softmax(dim=-1)             # (N, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)                 # (N, A)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


class Sparse(NamedTuple):
    """A sparse layer's weights other than its experts."""

    router: torch.Tensor                 # (E, D)
    shared: Mlp | None                   # Qwen2-MoE's shared expert
    shared_gate: torch.Tensor | None     # (1, D)


class MoeModel(DenseModel):
    """The dense decoder with sparse feed-forward layers. Expert weights are looked up by
    (layer, expert) through `expert_weights`, so that an expert cache can supply them."""

    def __init__(self, spec: ModelSpec, weights: dict[str, Weight]) -> None:
        super().__init__(spec, weights)
        self.sparse: dict[int, Sparse] = {}
        self.resident: dict[int, dict[int, ExpertWeights]] = {}   # present at build time
        for n in range(spec.num_layers):
            if spec.sparse_layers[n]:
                p = f"model.layers.{n}.mlp."
                shared = Mlp.of(weights, p + "shared_expert.") \
                    if spec.shared_expert_intermediate_size else None
                router = floats(weights, p + "gate.weight")
                assert router is not None
                self.sparse[n] = Sparse(router, shared,
                                        floats(weights, p + "shared_expert_gate.weight"))
                self.resident[n] = _experts_of(spec, weights, p)
        self.expert_weights: ExpertLookup = self._resident_expert

    def _resident_expert(self, layer: int, e: int) -> ExpertWeights:
        return self.resident[layer][e]

    def _feed_forward(self, n: int, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        sparse = self.sparse.get(n)
        if sparse is None:
            return super()._feed_forward(n, h, batch)
        b, s, d = h.shape
        x = h[batch.valid] if batch.padded else h.reshape(b * s, d)     # (N, D): real tokens
        ids, gates = route(x, sparse.router, self.spec.experts_per_token,
                           self.spec.norm_topk_prob)
        y = self.run_experts(n, x, ids, gates)
        if sparse.shared is not None and sparse.shared_gate is not None:
            y = y + torch.sigmoid(F.linear(x, sparse.shared_gate)) * mlp(x, sparse.shared)
        if not batch.padded:
            return y.view(b, s, d)
        out = h.new_zeros(b, s, d)
        out[batch.valid] = y
        return out

    def run_experts(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                    gates: torch.Tensor) -> torch.Tensor:
        """sum over a of gates[:, a] * expert_{ids[:, a]}(x), expert by expert: the tokens
        routed to an expert are gathered and go through its fused gate/up and its down
        matmul. The experts are computed in `expert_order`, but their outputs are summed
        in expert order, so the result does not depend on that order.
        x (N, D), ids and gates (N, A) -> (N, D)."""
        top_k = ids.shape[1]
        flat = ids.flatten()                                        # (N * A,)
        order = torch.argsort(flat, stable=True)                    # grouped by expert
        counts = torch.bincount(flat, minlength=self.spec.num_experts).tolist()
        tokens = order // top_k                                     # token of each pick
        weights = gates.flatten()[order].to(x.dtype)[:, None]
        starts = list(itertools.accumulate(counts, initial=0))
        picked = [e for e, count in enumerate(counts) if count]
        ys = x.new_empty(flat.shape[0], x.shape[1])                 # (N * A, D)
        for e in self.expert_order(layer, picked):
            span = slice(starts[e], starts[e + 1])
            gate_up, down = self.expert_weights(layer, e)
            gate, up = matmul(x[tokens[span]], gate_up).chunk(2, dim=-1)    # (n, I) each
            torch.mul(matmul(F.silu(gate) * up, down), weights[span], out=ys[span])
        out = torch.zeros_like(x)
        for e in picked:        # by expert: rows unique per call, deterministic on CUDA too
            span = slice(starts[e], starts[e + 1])
            out.index_add_(0, tokens[span], ys[span])
        return out

    def expert_order(self, layer: int, experts: list[int]) -> list[int]:
        """The order to compute a layer's picked experts in (an expert cache puts those
        still being copied in last)."""
        return experts


def _experts_of(spec: ModelSpec, w: dict[str, Weight], p: str
                ) -> dict[int, ExpertWeights]:
    """The experts whose weights are resident (an expert cache supplies the others)."""
    if spec.expert_layout == "stacked":
        gate_up, down = w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"]
        return {e: (gate_up[e], down[e]) for e in range(spec.num_experts)}
    names = {e: (f"{p}experts.{e}.gate_up_proj.weight", f"{p}experts.{e}.down_proj.weight")
             for e in range(spec.num_experts)}
    return {e: (w[g], w[d]) for e, (g, d) in names.items() if g in w and d in w}


def build(spec: ModelSpec, weights: dict[str, Weight]) -> MoeModel:
    return MoeModel(spec, weights)
