"""edgeserve.sampling: the sampler (greedy, seeded, top-k, top-p, temperature)."""

import pytest
import torch

from edgeserve.sampling import SamplingError, SamplingParams, make_generator, sample


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
