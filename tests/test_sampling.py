"""The sampling filters of generate.py on hand-made logits: exact kept sets and values."""

from __future__ import annotations

import math

import pytest
import torch

from semilla.config import GenerateConfig
from semilla.generate import (
    SamplingParams,
    apply_frequency_presence,
    apply_repetition_penalty,
    choose_tokens,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    process_logits,
)

INF = math.inf
PROBS = [0.5, 0.3, 0.15, 0.05]


def col(*values, dtype=torch.float32) -> torch.Tensor:
    """Per-row settings as the (B, 1) column the filters take."""
    return torch.tensor(values, dtype=dtype).unsqueeze(1)


def kept(logits: torch.Tensor) -> list[list[int]]:
    """Indices each row keeps (not -inf)."""
    return [torch.nonzero(row > -INF).flatten().tolist() for row in logits]


# --- top-k ---------------------------------------------------------------------------------


def test_top_k_keeps_the_k_highest_logits_untouched():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = filter_top_k(logits, col(2, dtype=torch.long))
    assert out.tolist() == [[-INF, 3.0, 2.0, -INF]]


def test_top_k_zero_is_off_and_k_beyond_the_vocab_keeps_all():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 2.0, 1.0]])
    assert torch.equal(filter_top_k(logits, col(0, 99, dtype=torch.long)), logits)


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert kept(filter_top_k(logits, col(1, dtype=torch.long))) == [[1, 2]]
    assert kept(filter_top_k(logits, col(3, dtype=torch.long))) == [[0, 1, 2]]


def test_top_k_is_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    out = filter_top_k(logits, col(1, 3, dtype=torch.long))
    assert kept(out) == [[1], [0, 1, 2]]


# --- top-p ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.3, [0]),  # the most likely token is always kept
        (0.5, [0]),  # 0.5 alone already reaches 0.5
        (0.79, [0, 1]),
        (0.8, [0, 1]),  # exactly the mass of the first two: smallest set with mass >= p
        (0.81, [0, 1, 2]),
        (0.96, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p, expected):
    logits = torch.tensor([PROBS]).log()
    out = filter_top_p(logits, col(p))
    assert kept(out) == [expected]
    assert torch.equal(out[0, expected], logits[0, expected])  # kept logits are unchanged


def test_top_p_follows_probability_not_position():
    order = [2, 0, 3, 1]  # probabilities 0.15, 0.5, 0.05, 0.3
    logits = torch.tensor([[PROBS[i] for i in order]]).log()
    assert kept(filter_top_p(logits, col(0.79))) == [[1, 3]]


def test_top_p_of_one_never_drops_the_tail_of_a_wide_distribution():
    # float32 cumulative sums reach 1.0 before the last tokens of a peaked 1000-way softmax;
    # top_p = 1 must still mean "off", or a batch row differs from the same row alone
    torch.manual_seed(0)
    logits = torch.randn(8, 1000) * 3
    assert torch.equal(filter_top_p(logits, torch.ones(8, 1)), logits)


# --- min-p ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.0, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.5, [0, 1]), (0.9, [0])],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability(min_p, expected):
    logits = torch.tensor([PROBS]).log()
    assert kept(filter_min_p(logits, col(min_p))) == [expected]


# --- penalties -----------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, col(2.0))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # unseen tokens untouched


def test_repetition_penalty_of_one_changes_nothing():
    logits = torch.tensor([[2.0, -2.0, 0.0]])
    seen = torch.ones(1, 3, dtype=torch.bool)
    assert torch.equal(apply_repetition_penalty(logits, seen, col(1.0)), logits)


def test_frequency_and_presence_follow_openai():
    # logit -= count * frequency + (count > 0) * presence
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    out = apply_frequency_presence(logits, counts, col(0.5), col(0.25))
    assert out.tolist() == [[1.0, 0.25, -0.75]]
    encouraged = apply_frequency_presence(logits, counts, col(-0.5), col(0.0))
    assert encouraged.tolist() == [[1.0, 1.5, 2.5]]


# --- the whole pipeline --------------------------------------------------------------------


def params(*cfgs: GenerateConfig) -> SamplingParams:
    return SamplingParams.from_configs(cfgs, "cpu")


def test_temperature_zero_takes_the_argmax_of_the_penalized_logits():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]])
    seen = torch.tensor([[False, True, False, False]])
    counts = torch.zeros(1, 4)
    p = params(GenerateConfig(temperature=0))
    assert choose_tokens(process_logits(logits, p, seen, counts), p, [None]).tolist() == [1]
    p = params(GenerateConfig(temperature=0, repetition_penalty=1.2))  # 2.0 / 1.2 < 1.9
    assert choose_tokens(process_logits(logits, p, seen, counts), p, [None]).tolist() == [2]


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    p = params(GenerateConfig(temperature=2.0))
    out = process_logits(logits, p, torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 3))
    assert torch.allclose(out, logits / 2)


def test_each_row_of_a_batch_gets_its_own_settings():
    cfgs = [
        GenerateConfig(temperature=0.7, top_k=5),
        GenerateConfig(temperature=1.3, top_p=0.6),
        GenerateConfig(temperature=0),
        GenerateConfig(min_p=0.1, repetition_penalty=1.3),
        GenerateConfig(frequency_penalty=0.5, presence_penalty=-0.3, top_k=3, top_p=0.9),
        GenerateConfig(),
    ]
    torch.manual_seed(0)
    B, V = len(cfgs), 50
    logits = torch.randn(B, V) * 3
    counts = torch.randint(0, 3, (B, V)).float()
    seen = counts > 0
    batch = process_logits(logits, params(*cfgs), seen, counts)
    for b, cfg in enumerate(cfgs):
        alone = process_logits(logits[b : b + 1], params(cfg), seen[b : b + 1], counts[b : b + 1])
        assert torch.allclose(batch[b : b + 1], alone, rtol=0, atol=1e-6), cfg
    assert kept(batch[:1])[0] == logits[0].topk(5).indices.sort().values.tolist()


def test_sampling_draws_from_the_filtered_distribution():
    # top-k 3 of [0.5, 0.3, 0.15, 0.05] renormalizes to [0.526, 0.316, 0.158, 0]
    n = 4000
    p = params(*[GenerateConfig(top_k=3)] * n)
    logits = process_logits(
        torch.tensor([PROBS]).log().expand(n, -1),
        p,
        torch.zeros(n, 4, dtype=torch.bool),
        torch.zeros(n, 4),
    )
    gen = torch.Generator().manual_seed(0)
    draws = choose_tokens(logits, p, [gen] * n)
    freq = torch.bincount(draws, minlength=4).float() / n
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert freq[3] == 0
    assert torch.allclose(freq, expected, atol=0.03), freq


def test_a_seeded_generator_repeats_its_draws():
    logits = torch.zeros(1, 100)
    p = params(GenerateConfig(seed=3))

    def draw(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [int(choose_tokens(logits, p, [gen])[0]) for _ in range(20)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
