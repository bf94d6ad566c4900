"""Sampling parameters, batched token sampling and per-token log-probabilities."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from edgeserve.constrain.grammar import Grammar

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 512     # the matcher keeps every prefix of every stop string
GREEDY_BELOW = 1e-5       # temperatures this small divide logits into inf: use argmax
MAX_LOGPROBS = 20


class SamplingError(ValueError):
    """A sampling parameter is invalid; `param` names the offending parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `max_tokens=True` is a client bug, not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise SamplingError(name, f"must be >= {minimum}, got {value}")


def _check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingError(name, f"must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise SamplingError(name, f"must be finite, got {number}")
    return number


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request, and when to stop it."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n: the chosen token's and the n most likely
    grammar: Grammar | None = None  # the output is constrained to this grammar
    # max_tokens beyond what the context leaves after the prompt: cut there (finish reason
    # "length") when True, refuse the request when False (OpenAI's contract).
    clamp_max_tokens: bool = True

    def validate(self) -> None:
        """Raise SamplingError naming the first invalid parameter."""
        _check_int("max_tokens", self.max_tokens, minimum=1)
        if _check_finite("temperature", self.temperature) < 0:
            raise SamplingError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < _check_finite("top_p", self.top_p) <= 1:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=0)
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingError("seed", f"must be an integer or None, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError("stop", f"must be a tuple of at most {MAX_STOP_STRINGS} strings")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", "stop strings must be non-empty strings")
        if any(len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise SamplingError("stop", f"stop strings may be at most {MAX_STOP_LENGTH} long")
        if not isinstance(self.stop_token_ids, tuple):
            raise SamplingError("stop_token_ids", "must be a tuple of token ids")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise SamplingError("logprobs", f"must be at most {MAX_LOGPROBS}")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise SamplingError("grammar", f"must be a Grammar, got {self.grammar!r}")
        if not isinstance(self.clamp_max_tokens, bool):
            raise SamplingError("clamp_max_tokens", "must be a bool")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @classmethod
    def from_options(cls, **options: Any) -> SamplingParams:
        """Build validated params from user-facing options; None means the default."""
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in options.items():
            if name not in names:
                raise SamplingError(name, "unknown sampling option")
            if value is not None:
                kwargs[name] = _coerce(name, value)
        params = cls(**kwargs)
        params.validate()
        return params


def _coerce(name: str, value: Any) -> Any:
    """Turn JSON-shaped option values into the field types; validate() checks the rest."""
    if name in ("temperature", "top_p"):
        return _check_finite(name, value)
    if name == "stop":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list | tuple):
            return tuple(value)
        raise SamplingError(name, f"must be a string or a list of strings, got {value!r}")
    if name == "stop_token_ids":
        if isinstance(value, list | tuple):
            return tuple(value)
        raise SamplingError(name, f"must be a list of token ids, got {value!r}")
    return value


def make_generator(
    params: SamplingParams, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """A generator for one sequence, or None when the request is unseeded.

    One generator per sequence makes a seeded request draw the same tokens whatever
    else shares its batch.
    """
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed % 2**64)  # torch only takes seeds in 64 bits
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row: logits (B, V) -> token ids (B,) int64 on the logits' device."""
    if logits.dim() != 2 or not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)} need one params and one generator per row, "
            f"got {len(params)} and {len(generators)}"
        )
    device = logits.device
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == len(params):
        return _argmax(logits)
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=device)
    # A row's path depends only on its own params, so its draws do not depend on the batch.
    plain = [i for i, p in enumerate(params) if not p.greedy and not _filters(p)]
    filtered = [i for i, p in enumerate(params) if not p.greedy and _filters(p)]
    if greedy:
        rows = torch.tensor(greedy, device=device)
        out[rows] = _argmax(logits[rows])
    if plain:
        rows = torch.tensor(plain, device=device)
        probs = _scaled(logits, plain, params).softmax(dim=-1)
        out[rows] = _draw(probs, [generators[i] for i in plain])
    if filtered:
        rows = torch.tensor(filtered, device=device)
        probs, order = _filtered_probs(_scaled(logits, filtered, params), filtered, params)
        picked = _draw(probs, [generators[i] for i in filtered])
        out[rows] = order.gather(1, picked[:, None]).squeeze(1)
    return out


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest logit: max's indices, several times faster than argmax
    over a vocabulary on the CPU, and the same (both take the first of equal values)."""
    return logits.max(dim=-1).indices


def _filters(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1


def _scaled(
    logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams]
) -> torch.Tensor:
    temps = torch.tensor(
        [params[i].temperature for i in rows], dtype=torch.float32, device=logits.device
    )
    index = torch.tensor(rows, device=logits.device)
    return logits[index].float() / temps[:, None]  # (R, V)


def _filtered_probs(
    x: torch.Tensor, rows: list[int], params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p over scaled logits x (R, V): (probs in sorted order, sorted ids)."""
    device, vocab = x.device, x.shape[-1]
    # Stable, so tied logits keep the same order in any batch.
    x, order = x.sort(dim=-1, descending=True, stable=True)
    top_k = torch.tensor([min(params[i].top_k or vocab, vocab) for i in rows], device=device)
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32, device=device)
    position = torch.arange(vocab, device=device)
    x = x.masked_fill(position[None, :] >= top_k[:, None], -math.inf)
    probs = x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # 0 for the first token, so it always stays
    # top_p == 1 keeps everything; rounding in cumsum must not drop the tail.
    outside = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    outside[:, 0] = False   # the most likely token always stays, however small top_p is
    return x.masked_fill(outside, -math.inf).softmax(dim=-1), order


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per row of probs (R, V); seeded rows use their own generator."""
    picked = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if unseeded:
        rows = torch.tensor(unseeded, device=probs.device)
        picked[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for j, generator in enumerate(generators):
        if generator is None:
            continue
        if not _same_device(generator.device, probs.device):
            raise ValueError(f"generator on {generator.device} but logits on {probs.device}")
        picked[j : j + 1] = torch.multinomial(probs[j : j + 1], 1, generator=generator)[0]
    return picked


def _same_device(a: torch.device, b: torch.device) -> bool:
    # An index of None means "the current device", so only compare explicit indices.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities of the chosen tokens under the model, and the `top` most likely.

    logits (R, V), tokens (R,) -> ([R], [R][top] of (token id, logprob)).
    """
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    if top == 0:
        return chosen, [[] for _ in chosen]
    values, ids = logp.topk(top, dim=-1)
    return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(),
                                                                  strict=True)]
