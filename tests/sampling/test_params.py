"""edgeserve.sampling: parameter validation and conversion from user options."""

import math

import pytest
import torch

from edgeserve.sampling import SamplingError, SamplingParams, make_generator

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

