"""Sampling controls as pure functions, checked one by one, against Hugging Face's logits processors, and
statistically (a chi-square test of sampled token frequencies against the filtered distribution)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import GenerationError
from lmforge.generation.sampling import (
    SamplingParams,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    apply_temperature,
    greedy,
    make_generators,
    min_p_filter,
    process_logits,
    sample,
    sample_next_token,
    token_counts,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


def random_logits(B=4, V=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


# ---- each function alone ------------------------------------------------------------------------------------------
def test_temperature_scales_logits_and_sharpens():
    z = random_logits()
    assert torch.equal(apply_temperature(z, 1.0), z)
    torch.testing.assert_close(apply_temperature(z, 0.5), z * 2)
    ent = lambda x: -(x.softmax(-1) * x.log_softmax(-1)).sum(-1)  # noqa: E731
    assert (ent(apply_temperature(z, 0.5)) < ent(z)).all() and (ent(apply_temperature(z, 2.0)) > ent(z)).all()
    with pytest.raises(GenerationError):
        apply_temperature(z, 0.0)


def test_temperature_to_zero_and_top_k_1_equal_greedy():
    z = random_logits(B=8)
    want = greedy(z)
    assert torch.equal(want, z.argmax(-1))
    gens = make_generators(0, 8)
    for _ in range(5):
        assert torch.equal(sample_next_token(z, SamplingParams(temperature=1e-4), gens), want)
        assert torch.equal(sample_next_token(z, SamplingParams(temperature=1.5, top_k=1), gens), want)
        assert torch.equal(sample_next_token(z, SamplingParams(temperature=0.0)), want)
    # top_p so small that only the argmax survives
    assert torch.equal(sample_next_token(z, SamplingParams(top_p=1e-6), gens), want)


def test_top_k_keeps_exactly_k():
    z = random_logits()
    out = top_k_filter(z, 5)
    assert (torch.isfinite(out).sum(-1) == 5).all()
    kept = torch.isfinite(out)
    assert torch.equal(kept, z >= torch.topk(z, 5).values[:, -1:])
    assert torch.equal(out[kept], z[kept])
    assert torch.equal(top_k_filter(z, None), z) and torch.equal(top_k_filter(z, 0), z)
    assert torch.equal(top_k_filter(z, 1000), z)


def test_top_p_keeps_smallest_set_with_mass_at_least_p():
    z = random_logits(B=16, V=40)
    for p in (0.1, 0.5, 0.9, 0.99):
        out = top_p_filter(z, p)
        probs = z.softmax(-1)
        for row in range(z.shape[0]):
            kept = torch.isfinite(out[row])
            mass = probs[row][kept].sum().item()
            assert mass >= p - 1e-6, (p, mass)
            # smallest: removing the least likely kept token drops the mass below p
            least = probs[row][kept].min().item()
            assert mass - least < p
            # the kept set is the top of the ranking (no gaps)
            assert probs[row][kept].min() >= probs[row][~kept].max() if (~kept).any() else True
    assert torch.equal(top_p_filter(z, 1.0), z)
    # a worked example: masses 0.5, 0.3, 0.2 with p = 0.7 -> keep two
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    assert torch.isfinite(top_p_filter(lp, 0.7)).tolist() == [[False, True, True]]
    assert torch.isfinite(top_p_filter(lp, 0.5)).tolist() == [[False, True, False]]  # exactly p: the set is enough


def test_min_p_threshold_relative_to_top_token():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    out = min_p_filter(probs.log(), 0.15)  # threshold 0.075
    assert torch.isfinite(out).tolist() == [[True, True, True, False, False]]
    assert torch.equal(min_p_filter(probs.log(), None), probs.log())


def test_repetition_penalty_hf_semantics():
    z = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(z, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert torch.equal(apply_repetition_penalty(z, seen, None), z)


def test_frequency_presence_penalty_openai_formula():
    z = random_logits(B=2, V=6)
    counts = token_counts([[1, 1, 3], [5]], 6)
    assert counts.tolist() == [[0, 2, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]]
    out = apply_frequency_presence_penalty(z, counts, 0.5, 0.25)
    want = z - counts * 0.5 - (counts > 0).float() * 0.25
    torch.testing.assert_close(out, want)


# ---- against Hugging Face's processors -------------------------------------------------------------------------
def test_process_logits_equals_transformers_processors():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    z = random_logits(B=6, V=64, seed=3)
    g = torch.Generator().manual_seed(1)
    prev = torch.randint(0, 64, (6, 12), generator=g)
    seen = token_counts(prev.tolist(), 64) > 0
    for t, k, p, mp, rp in [(0.7, 20, 0.9, None, 1.3), (1.3, None, 0.5, 0.05, None), (1.0, 5, None, 0.2, 0.8),
                            (0.5, 40, 0.95, None, None)]:
        procs = LogitsProcessorList()
        if rp:
            procs.append(RepetitionPenaltyLogitsProcessor(rp))
        procs.append(TemperatureLogitsWarper(t))
        if k:
            procs.append(TopKLogitsWarper(k))
        if p:
            procs.append(TopPLogitsWarper(p))
        if mp:
            procs.append(MinPLogitsWarper(mp))
        want = procs(prev, z.clone())
        got = process_logits(z, SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rp),
                             seen=seen)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (t, k, p, mp, rp)
        torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])


# ---- statistics: sampled frequencies match the filtered distribution ---------------------------------------------
def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit over the tokens with non-zero expected probability."""
    n = counts.sum().item()
    support = probs > 0
    expected = probs[support] * n
    stat = (((counts[support].double() - expected) ** 2) / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))  # P(X >= stat)


@pytest.mark.parametrize("controls", [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=4),
    dict(temperature=1.2, top_p=0.8),
    dict(temperature=0.9, top_k=6, top_p=0.9),
    dict(temperature=1.0, min_p=0.1),
])
def test_sampled_frequencies_match_filtered_distribution(controls):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    params = SamplingParams(**controls)
    probs = process_logits(logits[None], params)[0].softmax(-1)
    N = 40_000
    gen = torch.Generator().manual_seed(1234)
    draws = sample_next_token(logits.expand(N, -1), params, gen)
    counts = torch.bincount(draws, minlength=10)
    assert counts[probs == 0].sum() == 0, "a filtered-out token was drawn"
    assert (probs > 0).sum() < 10 or not any(k in controls for k in ("top_k", "top_p", "min_p"))
    p = chi_square_pvalue(counts, probs)
    assert p > 1e-4, f"chi-square p-value {p:.2e}: frequencies {counts.tolist()} vs {probs.tolist()}"
    # the test has power: the unfiltered distribution is rejected when a filter was applied
    if any(k in controls for k in ("top_k", "top_p", "min_p")) or controls["temperature"] != 1.0:
        assert chi_square_pvalue(counts, logits.softmax(-1)) < 1e-6


# ---- generators ----------------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_per_row():
    z = random_logits(B=3, V=100, scale=0.5)
    params = SamplingParams(temperature=1.0)
    a = [sample(z, make_generators(7, 3)).tolist() for _ in range(2)]
    assert a[0] == a[1]
    gens = make_generators(7, 3)
    seq1 = [sample(z, gens).tolist() for _ in range(20)]
    gens = make_generators(8, 3)
    seq2 = [sample(z, gens).tolist() for _ in range(20)]
    assert seq1 != seq2
    # the same seed gives every row the same random stream: row 0 alone == row 0 in a batch
    alone = [sample(z[:1], make_generators(7, 1)).item() for _ in range(1)]
    assert alone[0] == a[0][0]
    torch.manual_seed(0)
    u1 = sample_next_token(z, params, make_generators(None, 3)).tolist()
    torch.manual_seed(0)
    u2 = sample_next_token(z, params, make_generators(None, 3)).tolist()
    assert u1 == u2  # unseeded draws follow torch.manual_seed


# ---- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, word", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(frequency_penalty=3.0), "frequency_penalty"),
    (dict(top_logprobs=50), "top_logprobs"),
    (dict(seed="x"), "seed"),
])
def test_bad_controls_are_one_line_errors(bad, word):
    with pytest.raises(GenerationError) as e:
        SamplingParams(**bad)
    msg = str(e.value)
    assert word in msg and "\n" not in msg and repr(next(iter(bad.values()))) in msg


def test_greedy_property_and_math_sanity():
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.1).greedy
    assert math.isclose(top_p_filter(torch.zeros(1, 4), 0.5).isfinite().sum().item(), 2)
