"""Per-sequence grammar state, and the step hooks: mask the logits, advance on the token."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xgrammar as xgr

from edgeserve.constrain.grammar import Grammar, GrammarError, compile_grammar
from edgeserve.model import ResidentModel
from edgeserve.results import InvalidRequest
from edgeserve.tokenizer import Tokenizer


class GrammarState:
    """Where one sequence stands in its grammar. Owned by the engine's step thread."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = compiled.tokenizer_info.vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (1 bit per token id)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by token; False when the grammar does not allow it."""
        return bool(self._matcher.accept_token(token))

    @property
    def complete(self) -> bool:
        """A stop token was accepted: the output is a whole sentence of the grammar."""
        return bool(self._matcher.is_terminated())


def mask_logits(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> torch.Tensor:
    """Set the logits of tokens the grammars forbid to -inf, in place, for the rows that have
    a grammar. logits (R, V); states: one per row (None: free)."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    vocab = logits.shape[1]
    # (B, ceil(V / 32)) int32, all bits set: free rows allow everything.
    bitmask = xgr.allocate_token_bitmask(len(states), vocab)
    for i in rows:
        state = states[i]
        assert state is not None
        state.fill(bitmask, i)
    if logits.device.type != "cpu" or not logits.is_contiguous():
        # The library's kernel, on the logits' device.
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=vocab)
        return logits
    # On the CPU, numpy (one thread, no hand-off to torch's pool) unpacks the bits and
    # fills several times faster than the library's CPU kernel. Bit b of word w is token
    # 32 w + b: little-endian words read as bytes, in little bit order.
    out = logits.numpy()                # the same memory
    allowed = np.unpackbits(bitmask.numpy()[rows].view(np.uint8), axis=1,
                            bitorder="little")[:, :vocab]
    if len(rows) == len(states):
        np.copyto(out, -np.inf, where=allowed == 0)
    else:
        for j, i in enumerate(rows):
            np.copyto(out[i], -np.inf, where=allowed[j] == 0)
    return logits


def advance(states: Sequence[GrammarState | None], tokens: Sequence[int]) -> None:
    """Each constrained row takes its sampled token (allowed by the mask, so accepted)."""
    for state, token in zip(states, tokens, strict=True):
        if state is not None and not state.accept(token):
            raise RuntimeError(f"token {token} is outside the grammar")


def start_grammar(grammar: Grammar, tokenizer: Tokenizer, model: ResidentModel) -> GrammarState:
    """A new sequence's state in grammar, over model's vocabulary (compiled on first use)."""
    try:
        compiled = compile_grammar(grammar, tokenizer, model.spec.vocab_size,
                                   model.eos_token_ids | tokenizer.eos_token_ids)
    except GrammarError as e:
        raise InvalidRequest(str(e), "grammar") from e
    return GrammarState(compiled)
