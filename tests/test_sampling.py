"""Tests for edgeserve.sampling: parameter validation, the sampler and StopMatcher."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeserve.sampling import SamplingError, SamplingParams, StopMatcher, make_generator, sample

# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop": tuple(f"s{i}" for i in range(17))}, "stop"),
        ({"stop_token_ids": (3, -1)}, "stop_token_ids"),
    ],
)
def test_validate_rejects_bad_values(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs).validate()  # type: ignore[arg-type]
    assert info.value.param == param
    with pytest.raises(SamplingError) as info:
        SamplingParams.from_options(**kwargs)
    assert info.value.param == param


def test_validate_accepts_edges() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0).validate()
    SamplingParams(stop=tuple(f"s{i}" for i in range(16)), seed=-5).validate()


def test_from_options_unknown_name() -> None:
    with pytest.raises(SamplingError) as info:
        SamplingParams.from_options(temperature=0.5, frequency_penalty=1.0)
    assert info.value.param == "frequency_penalty"


def test_from_options_converts_user_values() -> None:
    params = SamplingParams.from_options(
        max_tokens=8, temperature=0, top_p=None, stop="END", stop_token_ids=[2, 7], seed=None
    )
    assert params == SamplingParams(
        max_tokens=8, temperature=0.0, stop=("END",), stop_token_ids=(2, 7)
    )
    assert isinstance(params.temperature, float)
    assert SamplingParams.from_options(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams.from_options(stop=None) == SamplingParams()
    with pytest.raises(SamplingError) as info:
        SamplingParams.from_options(stop=5)
    assert info.value.param == "stop"


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


def test_make_generator() -> None:
    assert make_generator(SamplingParams()) is None
    a = make_generator(SamplingParams(seed=7))
    b = make_generator(SamplingParams(seed=7))
    assert a is not None and b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --- sampler ------------------------------------------------------------------


def _draws(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """n unseeded draws from one row of logits, as one batch."""
    return sample(logits.expand(n, -1), [params] * n, [None] * n)


def test_greedy_equals_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0)] * 6
    out = sample(logits, params, [None] * 6)
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert torch.equal(out, logits.argmax(dim=-1))


def test_greedy_takes_the_first_of_tied_logits() -> None:
    logits = torch.zeros(3, 40000)
    logits[:, [7, 20000, 39999]] = 5.0          # ties far apart in a vocabulary-wide row
    logits[1, 3] = float("nan")                 # argmax's rule: a NaN wins
    logits[2] = 1.0                             # all equal
    out = sample(logits, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert out.tolist() == [7, 3, 0] == logits.argmax(dim=-1).tolist()


def test_greedy_rows_in_mixed_batch_and_half_precision() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    greedy = SamplingParams(temperature=0.0)
    params = [greedy, SamplingParams(top_p=0.5), SamplingParams(), greedy]
    out = sample(logits, params, [None] * 4)
    assert out.dtype == torch.int64
    assert out[0] == logits[0].argmax() and out[3] == logits[3].argmax()


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(5)]
    gens = [make_generator(p) for p in params]
    for _ in range(5):
        assert torch.equal(sample(logits, params, gens), logits.argmax(dim=-1))


def _seeded_sequence(batch_params: list[SamplingParams], row: int, steps: int) -> list[int]:
    vocab = 64
    gens = [make_generator(p) for p in batch_params]
    # Separate streams, so the tracked row's logits do not depend on the batch size.
    filler, tracked = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(len(batch_params), vocab, generator=filler)
        logits[row] = torch.randn(vocab, generator=tracked)
        tokens.append(int(sample(logits, batch_params, gens)[row]))
    return tokens


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    mine = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    alone = _seeded_sequence([mine], row=0, steps=20)
    assert alone == _seeded_sequence([mine], row=0, steps=20)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, seed=99),
        SamplingParams(top_k=3),
        mine,
        SamplingParams(top_p=0.5, seed=1234),
    ]
    assert _seeded_sequence(others, row=3, steps=20) == alone
    # A different seed really changes the draws, so the check above can fail.
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=4321)
    assert _seeded_sequence([other_seed], row=0, steps=20) != alone


def test_seeded_plain_row_is_batch_independent() -> None:
    mine = SamplingParams(seed=5)  # no top-k/top-p: takes the unfiltered path
    alone = _seeded_sequence([mine], row=0, steps=20)
    batch = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(top_p=0.3), mine]
    assert _seeded_sequence(batch, row=3, steps=20) == alone


def test_top_k_restricts_support() -> None:
    torch.manual_seed(0)
    logits = torch.randn(100, generator=torch.Generator().manual_seed(4)) * 0.3
    out = _draws(logits, SamplingParams(top_k=5), 3000)
    assert set(out.tolist()) == set(logits.topk(5).indices.tolist())


def test_top_p_restricts_support_to_nucleus() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.3, 0.05, 0.5, 0.1])
    logits = probs.log()
    out = _draws(logits, SamplingParams(top_p=0.75), 4000)
    # Sorted: 0.5, 0.3 | 0.1, ... -> mass before 0.1 is 0.8 >= 0.75, so only ids 3 and 1.
    assert set(out.tolist()) == {3, 1}
    assert (out == 3).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    wider = _draws(logits, SamplingParams(top_p=0.85), 4000)
    assert set(wider.tolist()) == {3, 1, 4}


def test_temperature_sharpens() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    freq = {}
    for temperature in (0.5, 2.0):
        out = _draws(logits, SamplingParams(temperature=temperature), 4000)
        freq[temperature] = (out == 0).float().mean().item()
        expected = (logits / temperature).softmax(-1)[0].item()
        assert freq[temperature] == pytest.approx(expected, abs=0.03)
    assert freq[0.5] > freq[2.0] + 0.3


def test_sample_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 4), [SamplingParams()], [None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_on_cuda() -> None:
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=10, seed=3), SamplingParams()]
    logits = torch.randn(3, 1000, device="cuda", dtype=torch.float16)
    gens = [make_generator(p, device="cuda") for p in params]
    out = sample(logits, params, gens)
    assert out.device.type == "cuda" and out.dtype == torch.int64
    assert out[0] == logits[0].argmax()
    again = sample(logits[1:2], params[1:2], [make_generator(params[1], device="cuda")])
    assert again[0] == out[1]
    with pytest.raises(ValueError):
        sample(logits, params, [None, make_generator(params[1]), None])


# --- StopMatcher --------------------------------------------------------------


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _stream(matcher: StopMatcher, deltas: list[str]) -> tuple[str, bool]:
    """Feed deltas like a server would: stop feeding once stopped, else flush at the end."""
    emitted = []
    for delta in deltas:
        text, stopped = matcher.push(delta)
        emitted.append(text)
        if stopped:
            return "".join(emitted), True
    emitted.append(matcher.flush())
    return "".join(emitted), matcher.stopped


_CHARS = st.text(alphabet="abc", max_size=3)


@st.composite
def _stop_case(draw: st.DrawFn) -> tuple[str, list[str], list[str]]:
    """Random text, stops related to it and to each other, and random delta boundaries."""
    stops: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["random", "prefix", "wrap"]))
        if kind == "prefix" and stops and len(stops[-1]) > 1:
            stops.append(stops[-1][: draw(st.integers(1, len(stops[-1]) - 1))])
        elif kind == "wrap" and stops:  # a longer stop that contains an earlier one
            stops.append(
                draw(_CHARS) + stops[-1] + draw(st.text(alphabet="abc", min_size=1, max_size=3))
            )
        else:
            stops.append(draw(st.text(alphabet="abc", min_size=1, max_size=5)))
    # Text built from stops, their prefixes and filler, so that matches and near misses occur.
    pieces = [draw(_CHARS)]
    for _ in range(draw(st.integers(0, 6))):
        piece = draw(st.sampled_from(stops)) if stops else ""
        if draw(st.booleans()):  # else the whole stop
            piece = piece[: draw(st.integers(0, len(piece)))]
        pieces += [piece, draw(_CHARS)]
    text = draw(st.sampled_from(["", "abcab"])) + "".join(pieces)
    if text and draw(st.booleans()):  # a stop that is a substring of the text
        start = draw(st.integers(0, len(text) - 1))
        stops.append(text[start : draw(st.integers(start + 1, min(len(text), start + 6)))])
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=20)))
    bounds = [0, *cuts, len(text)]
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    return text, stops, deltas


@settings(max_examples=400, deadline=None)
@given(_stop_case())
def test_stop_matcher_matches_reference(case: tuple[str, list[str], list[str]]) -> None:
    text, stops, deltas = case
    assert "".join(deltas) == text
    assert _stream(StopMatcher(stops), deltas) == _reference(text, stops)


def test_stop_spanning_three_deltas() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.push("hello </") == ("hello ", False)
    assert matcher.push("en") == ("", False)
    assert matcher.push("d> more") == ("", True)
    assert matcher.push("ignored") == ("", True)
    assert matcher.flush() == ""


def test_held_prefix_that_is_not_a_stop_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abc ST") == ("abc ", False)
    assert matcher.push("ART now") == ("START now", False)
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_flush_returns_held_text() -> None:
    matcher = StopMatcher(["STOP", "###"])
    assert matcher.push("xyz ST") == ("xyz ", False)
    assert matcher.flush() == "ST"
    assert not matcher.stopped


def test_no_stop_strings_pass_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("a") == ("a", False)
    assert matcher.push("bc") == ("bc", False)
    assert matcher.flush() == ""


def test_earlier_longer_stop_wins() -> None:
    # "cd" is complete, but "abcdef" started earlier and may still complete.
    matcher = StopMatcher(["abcdef", "cd"])
    assert matcher.push("xabcd") == ("x", False)
    assert matcher.push("ef") == ("", True)
    matcher = StopMatcher(["abcdef", "cd"])
    assert matcher.push("xabcd") == ("x", False)
    assert matcher.push("zz") == ("ab", True)
    matcher = StopMatcher(["abcdef", "cd"])
    assert matcher.push("xabcd") == ("x", False)
    assert matcher.flush() == "ab" and matcher.stopped


def test_stop_reported_on_the_delta_that_completes_it() -> None:
    matcher = StopMatcher(["\n\n", "User:"])
    assert matcher.push("Hi there.\n") == ("Hi there.", False)
    assert matcher.push("\nUser: more") == ("", True)


def test_extreme_values_do_not_break_sampling():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1e-300), SamplingParams(top_p=1e-300, temperature=1.0),
              SamplingParams(top_k=2**62, temperature=1.0)]
    for p in params:
        p.validate()
    out = sample(logits, params, [None, None, None])
    assert out[0] == logits[0].argmax() and out[1] == logits[1].argmax()
    assert 0 <= int(out[2]) < 50
    with pytest.raises(SamplingError):
        SamplingParams(stop=("x" * 10_000,)).validate()
