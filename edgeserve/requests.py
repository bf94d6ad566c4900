"""A request checked against its model before it is queued."""

from __future__ import annotations

from edgeserve.model import ResidentModel
from edgeserve.results import InvalidRequest
from edgeserve.sampling import SamplingParams


def check_prompt(model: ResidentModel, prompt: list[int], params: SamplingParams) -> None:
    if not prompt:
        raise InvalidRequest("the prompt is empty", "prompt")
    vocab = model.spec.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                             "prompt")
    if len(prompt) >= model.spec.max_positions:
        raise InvalidRequest(f"the prompt has {len(prompt)} tokens; model '{model.id}' "
                             f"accepts fewer than {model.spec.max_positions}", "prompt")
    room = model.spec.max_positions - len(prompt)
    if not params.clamp_max_tokens and params.max_tokens > room:
        raise InvalidRequest(f"max_tokens is {params.max_tokens}, but the context of "
                             f"{model.spec.max_positions} tokens leaves {room} after the "
                             f"prompt's {len(prompt)}", "max_tokens")
