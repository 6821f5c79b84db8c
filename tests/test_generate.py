"""The generation core: cache parity, batching, seeds, stops, logprobs, context, beam search."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from generation_helpers import FAMILIES, BigramModel, char_tokenizer, tiny_model

from semilla.config import GenerateConfig
from semilla.errors import ConfigError
from semilla.generate import ContextLengthError, beam_search, generate, stream

TOK = char_tokenizer()
PROMPTS = ["the quick", "En", "lazy dog. En un lugar"]


def ids(text: str) -> list[int]:
    return TOK.encode(text)


def greedy(**kw) -> GenerateConfig:
    return GenerateConfig(**{"max_new_tokens": 24, "temperature": 0.0, **kw})


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    return tiny_model(TOK, **FAMILIES[request.param])


@pytest.fixture(scope="module")
def llama():
    return tiny_model(TOK)


def tokens(gens) -> list[list[int]]:
    return [g.tokens for g in gens]


# --- parity: cache, batch, seeds -----------------------------------------------------------


def test_greedy_with_and_without_the_kv_cache_is_identical(model):
    prompts = [ids(p) for p in PROMPTS]
    cached = generate(model, prompts, greedy())
    uncached = generate(model, prompts, greedy(use_cache=False))
    assert tokens(cached) == tokens(uncached)
    assert all(len(g.tokens) == 24 and g.finish_reason == "length" for g in cached)


def test_a_batch_of_prompts_of_different_lengths_equals_one_at_a_time(model):
    prompts = [ids(p) for p in PROMPTS]
    cfgs = [greedy(), GenerateConfig(max_new_tokens=24, seed=7), greedy(max_new_tokens=5)]
    batch = generate(model, prompts, cfgs)
    alone = [generate(model, [p], c)[0] for p, c in zip(prompts, cfgs, strict=True)]
    assert tokens(batch) == tokens(alone)
    for b, a in zip(batch, alone, strict=True):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)


def test_num_samples_continuations_in_one_batch_equal_separate_runs(model):
    prompt = ids("the quick")
    cfgs = [GenerateConfig(max_new_tokens=20, top_k=10, seed=s) for s in range(4)]
    batch = generate(model, [prompt] * 4, cfgs)
    alone = [generate(model, [prompt], c)[0] for c in cfgs]
    assert tokens(batch) == tokens(alone)
    assert len({tuple(t) for t in tokens(batch)}) > 1  # the seeds give different samples


def test_a_fixed_seed_repeats_the_sample_and_another_seed_differs(llama):
    def sample(seed):
        return generate(llama, [ids("the")], GenerateConfig(max_new_tokens=30, seed=seed))[0]

    assert sample(1).tokens == sample(1).tokens
    assert sample(1).tokens != sample(2).tokens


def test_sampling_without_the_cache_matches_with_it(llama):
    cfg = GenerateConfig(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=5)
    with_cache = generate(llama, [ids("En un")], cfg)[0].tokens
    without = generate(llama, [ids("En un")], GenerateConfig(**{**cfg.__dict__, "use_cache": False}))
    assert with_cache == without[0].tokens


def test_stream_yields_one_event_per_running_row_per_step(llama):
    steps = list(stream(llama, [ids("a"), ids("the")], [greedy(max_new_tokens=2), greedy()]))
    assert [len(events) for events in steps] == [2, 2] + [1] * 22
    assert [e.finish_reason for e in steps[1]] == ["length", None]
    assert steps[-1][0].row == 1 and steps[-1][0].finish_reason == "length"


# --- stopping ------------------------------------------------------------------------------


def test_max_new_tokens_ends_with_length(llama):
    (g,) = generate(llama, [ids("the")], greedy(max_new_tokens=7))
    assert len(g.tokens) == 7 and g.finish_reason == "length"


def test_a_stop_token_ends_the_row_unemitted_with_stop(llama):
    full = generate(llama, [ids("the")], greedy())[0].tokens
    stop = full[5]
    before = full[: full.index(stop)]
    (g,) = generate(llama, [ids("the")], greedy(stop_token_ids=[stop]), stop_ids=[])
    assert g.tokens == before and g.finish_reason == "stop"
    (g,) = generate(llama, [ids("the")], greedy(), stop_ids=[stop])  # eos / end of turn
    assert g.tokens == before and g.finish_reason == "stop"


def test_ignore_eos_runs_past_the_eos_ids_but_not_stop_token_ids(llama):
    full = generate(llama, [ids("the")], greedy())[0].tokens
    (g,) = generate(llama, [ids("the")], greedy(ignore_eos=True), stop_ids=[full[3]])
    assert g.tokens == full
    (g,) = generate(llama, [ids("the")], greedy(ignore_eos=True, stop_token_ids=[full[3]]), stop_ids=[])
    assert g.tokens == full[: full.index(full[3])]


# <eos> is by far the likeliest first token and the likeliest after a (=8); b (=9) leads to a.
EOS, A, B = 3, 8, 9
EOS_FIRST = BigramModel(10, {2: {EOS: 0.9, A: 0.1}, A: {EOS: 0.6, B: 0.4}, B: {A: 1.0}})


def test_eos_ends_with_stop_and_min_new_tokens_suppresses_it():
    (g,) = generate(EOS_FIRST, [[2]], greedy(), stop_ids=[EOS])
    assert g.tokens == [] and g.finish_reason == "stop"
    (g,) = generate(EOS_FIRST, [[2]], greedy(min_new_tokens=3), stop_ids=[EOS])
    assert g.tokens == [A, B, A] and g.finish_reason == "stop"  # then a -> <eos>


# --- log-probabilities ---------------------------------------------------------------------


def test_logprobs_are_the_models_log_softmax_at_each_step(model):
    prompt = ids("the quick")
    (g,) = generate(model, [prompt], greedy(max_new_tokens=16, logprobs=5))
    seq = torch.tensor([prompt + g.tokens])
    with torch.no_grad():
        ref = model(seq).float().log_softmax(-1)[0, len(prompt) - 1 : -1]  # (16, V)
    expected = ref.gather(-1, torch.tensor(g.tokens)[:, None]).squeeze(-1)
    assert g.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    for step, alts in enumerate(g.top_logprobs):
        assert len(alts) == 5
        values = [v for _, v in alts]
        assert values == sorted(values, reverse=True)
        top = ref[step].topk(5)
        assert [i for i, _ in alts] == top.indices.tolist()
        assert values == pytest.approx(top.values.tolist(), abs=1e-4)
        assert alts[0][0] == g.tokens[step]  # greedy took the best alternative
    assert g.perplexity == pytest.approx(math.exp(-sum(g.logprobs) / len(g.logprobs)))


def test_no_alternatives_unless_asked(llama):
    (g,) = generate(llama, [ids("the")], greedy(max_new_tokens=3))
    assert g.top_logprobs == [[], [], []]


# --- prompts and the context ---------------------------------------------------------------


def test_an_empty_prompt_starts_from_bos(llama):
    (empty,) = generate(llama, [[]], greedy(), bos_id=TOK.bos_id)
    (bos,) = generate(llama, [[TOK.bos_id]], greedy(), bos_id=TOK.bos_id)
    assert empty.tokens == bos.tokens and empty.prompt_tokens == 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_long_prompt_is_cut_from_the_left_with_a_warning(family, caplog):
    m = tiny_model(TOK, **FAMILIES[family])  # block_size 64
    prompt = ids("the quick brown fox jumps over the lazy dog. " * 3)  # 135 tokens
    with caplog.at_level(logging.WARNING, logger="semilla.generate"):
        (g,) = generate(m, [prompt], greedy(max_new_tokens=200))
    assert "truncated from the left" in caplog.text
    assert g.prompt_tokens == 32  # half the context is left to generate into
    assert g.prompt_tokens + len(g.tokens) == 64 and g.finish_reason == "length"
    (same,) = generate(m, [prompt[-32:]], greedy(max_new_tokens=200))
    assert same.tokens == g.tokens  # the kept part is the newest tokens


def test_generation_stops_at_the_end_of_the_context(llama):
    prompt = ids("the quick brown fox jumps over the lazy dog. the end.")  # 53 of 64
    for use_cache in (True, False):
        (g,) = generate(llama, [prompt], greedy(max_new_tokens=100, use_cache=use_cache))
        assert len(prompt) + len(g.tokens) == 64 and g.finish_reason == "length"


def test_truncate_error_refuses_a_prompt_that_does_not_fit(llama):
    with pytest.raises(ContextLengthError, match="64"):
        generate(llama, [ids("x" * 64)], greedy(truncate="error"))
    with pytest.raises(ContextLengthError):
        list(stream(llama, [ids("x" * 80)], greedy(truncate="error")))


def test_the_lstm_has_no_context_limit():
    lstm = tiny_model(TOK, **FAMILIES["lstm"])
    prompt = ids("the quick brown fox jumps over the lazy dog. " * 3)
    (g,) = generate(lstm, [prompt], greedy(max_new_tokens=80, truncate="error"))
    assert g.prompt_tokens == len(prompt) and len(g.tokens) == 80


@pytest.mark.parametrize(
    "bad",
    [
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"temperature": -1.0},
        {"top_k": -1},
        {"max_new_tokens": 0},
        {"max_new_tokens": 10_000_000},
    ],
)
def test_invalid_settings_are_refused_before_generating(llama, bad):
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=name):
        generate(llama, [ids("the")], GenerateConfig(**bad))


# --- beam search ---------------------------------------------------------------------------

# Greedy takes a (0.5) then a (0.4): 0.2. Beam search finds b (0.4) then b (0.9): 0.36.
BEAM_TABLE = BigramModel(10, {2: {A: 0.5, B: 0.4, EOS: 0.1}, A: {A: 0.4, B: 0.3, EOS: 0.3}, B: {B: 0.9, A: 0.05, EOS: 0.05}})  # fmt: skip


def test_beam_search_finds_the_likelier_sequence_greedy_misses():
    cfg = GenerateConfig(max_new_tokens=2, num_beams=2, length_penalty=1.0)
    (greedy_gen,) = generate(BEAM_TABLE, [[2]], greedy(max_new_tokens=2), stop_ids=[EOS])
    assert greedy_gen.tokens == [A, A]
    beams = beam_search(BEAM_TABLE, [2], cfg, stop_ids=[EOS])
    assert [seq for seq, _ in beams] == [[B, B], [A, A]]
    assert beams[0][1] == pytest.approx(math.log(0.4 * 0.9) / 2, abs=1e-5)
    assert beams[1][1] == pytest.approx(math.log(0.5 * 0.4) / 2, abs=1e-5)


def test_greedy_is_exact_on_a_known_table():
    (g,) = generate(BEAM_TABLE, [[2]], greedy(max_new_tokens=4), stop_ids=[EOS])
    assert g.tokens == [A, A, A, A] and g.finish_reason == "length"
    expected = [math.log(0.5)] + [math.log(0.4)] * 3
    assert g.logprobs == pytest.approx(expected, abs=1e-4)


def test_one_beam_is_greedy():
    cfg = GenerateConfig(max_new_tokens=2, num_beams=1)
    assert beam_search(BEAM_TABLE, [2], cfg, stop_ids=[EOS])[0][0] == [A, A]


# <eos> at once 0.3, else a; after a: a 0.55, eos 0.45. The penalty decides the length.
LENGTH_TABLE = BigramModel(10, {2: {EOS: 0.3, A: 0.7}, A: {A: 0.55, EOS: 0.45}})


@pytest.mark.parametrize(
    ("length_penalty", "best", "score"),
    [
        (0.0, [A], math.log(0.7 * 0.45)),  # raw sums favour stopping early
        (1.0, [A, A, A], math.log(0.7 * 0.55 * 0.55) / 3),
        (2.0, [A, A, A], math.log(0.7 * 0.55 * 0.55) / 9),
    ],
)
def test_length_penalty_changes_which_length_wins(length_penalty, best, score):
    cfg = GenerateConfig(max_new_tokens=3, num_beams=2, length_penalty=length_penalty)
    beams = beam_search(LENGTH_TABLE, [2], cfg, stop_ids=[EOS])
    assert beams[0][0] == best
    assert beams[0][1] == pytest.approx(score, abs=1e-4)  # the table's 1e-6 floor


@pytest.mark.parametrize("family", ["llama", "gqa", "lstm"])
def test_beam_search_on_a_real_model_is_sorted_and_scored_by_the_model(family):
    m = tiny_model(TOK, **FAMILIES[family])
    prompt = ids("the quick")
    cfg = GenerateConfig(max_new_tokens=10, num_beams=3, length_penalty=1.0)
    beams = beam_search(m, prompt, cfg)
    assert len(beams) == 3
    scores = [s for _, s in beams]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(seq) for seq, _ in beams}) == 3
    for seq, score in beams:
        full = torch.tensor([prompt + seq])
        with torch.no_grad():
            lp = m(full).float().log_softmax(-1)[0, len(prompt) - 1 : -1]
        total = lp.gather(-1, torch.tensor(seq)[:, None]).sum()
        assert score == pytest.approx(float(total) / len(seq), abs=1e-4)
    one = beam_search(m, prompt, GenerateConfig(max_new_tokens=10, num_beams=1))[0][0]
    assert one == generate(m, [prompt], greedy(max_new_tokens=10))[0].tokens
