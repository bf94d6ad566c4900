"""edgeserve.stops: StopMatcher against a reference, delta by delta."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeserve.stops import StopMatcher


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

