"""Grammar-constrained decoding: JSON and JSON-schema grammars compiled per vocabulary
(cached per schema), one matcher per sequence, its allowed tokens masked into the logits
before sampling. The grammar library is xgrammar (bench/grammars.py measured it fastest
per step here)."""

from edgeserve.constrain.grammar import Grammar, GrammarError, compile_grammar
from edgeserve.constrain.matcher import GrammarState, advance, mask_logits, start_grammar

__all__ = ["Grammar", "GrammarError", "GrammarState", "advance", "compile_grammar",
           "mask_logits", "start_grammar"]
