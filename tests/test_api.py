"""The Python API: semilla.load(path) -> generate / stream / chat / score / complete."""

from __future__ import annotations

import json
import math

import pytest
import torch
from generation_helpers import FAMILIES, char_tokenizer, tiny_lm, tiny_model

import semilla
from semilla.api import LanguageModel, StopStringFilter
from semilla.checkpoint import save_checkpoint
from semilla.config import GenerateConfig
from semilla.errors import CheckpointError, ConfigError, SemillaError
from semilla.generate import generate
from semilla.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = char_tokenizer()
    path = tmp_path_factory.mktemp("api") / "ckpt"
    save_checkpoint(path, tiny_model(tok), tok)
    return path


@pytest.fixture(scope="module")
def lm(checkpoint) -> LanguageModel:
    return semilla.load(str(checkpoint), device="cpu")


# --- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "lstm"])
def test_a_loaded_checkpoint_generates_what_the_saved_model_did(tmp_path, family):
    original = tiny_lm(**FAMILIES[family])
    save_checkpoint(tmp_path / "ckpt", original.model, original.tokenizer)
    loaded = semilla.load(str(tmp_path / "ckpt"), device="cpu")
    before, after = (
        lm.generate("the", max_new_tokens=30, seed=3, ignore_eos=True) for lm in (original, loaded)
    )
    assert after == before and len(before) > 10
    assert loaded.config["path"] == str(tmp_path / "ckpt")


def test_a_checkpoint_from_a_newer_semilla_is_refused(tmp_path, checkpoint):
    import shutil

    shutil.copytree(checkpoint, tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    config["format_version"] = 999
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="upgrade semilla"):
        semilla.load(str(tmp_path / "new"), device="cpu")


def test_dtype_bfloat16_holds_the_weights_in_bfloat16_and_follows_float32(checkpoint, lm):
    half = semilla.load(str(checkpoint), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert lm.model.lm_head.weight.dtype == torch.float32  # auto on a CPU
    text = "the quick brown fox jumps over the lazy dog."
    assert half.score(text)["log_likelihood"] == pytest.approx(lm.score(text)["log_likelihood"], rel=0.02)
    (done,) = half.complete(
        [half.encode_prompt("En un")], half.settings(max_new_tokens=12, ignore_eos=True, seed=3)
    )
    assert len(done.tokens) == 12 and math.isfinite(done.perplexity)
    assert half.generate("En un", max_new_tokens=12, ignore_eos=True, seed=3) == done.text


def test_an_unknown_dtype_is_refused(checkpoint):
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32, bfloat16, got 'half'"):
        semilla.load(str(checkpoint), device="cpu", dtype="half")


# --- generate and stream -------------------------------------------------------------------


def test_generate_is_the_core_decoded(lm):
    text = lm.generate("the quick", max_new_tokens=20, temperature=0)
    (g,) = generate(
        lm.model, [lm.tokenizer.encode("the quick")], GenerateConfig(20, temperature=0), lm.stop_ids
    )
    assert text == lm.tokenizer.decode(g.tokens, skip_special_tokens=True)


def test_a_seed_repeats_the_text(lm):
    first = lm.generate("En", max_new_tokens=30, seed=11)
    assert lm.generate("En", max_new_tokens=30, seed=11) == first
    assert lm.generate("En", max_new_tokens=30, seed=12) != first


@pytest.mark.parametrize("settings", [{"seed": 4}, {"temperature": 0}, {"seed": 4, "top_k": 5}])
def test_the_concatenated_stream_equals_generate(lm, settings):
    pieces = list(lm.stream("the", max_new_tokens=40, **settings))
    assert "".join(pieces) == lm.generate("the", max_new_tokens=40, **settings)


def test_num_samples_returns_a_list_where_sample_i_uses_seed_plus_i(lm):
    samples = lm.generate("the", num_samples=3, max_new_tokens=20, seed=5)
    assert isinstance(samples, list) and len(samples) == 3
    assert samples == [lm.generate("the", max_new_tokens=20, seed=5 + i) for i in range(3)]


def test_num_beams_returns_the_best_beam(lm):
    text = lm.generate("the quick", max_new_tokens=8, num_beams=3)
    from semilla.generate import beam_search

    best, _ = beam_search(
        lm.model, lm.tokenizer.encode("the quick"), GenerateConfig(8, num_beams=3), lm.stop_ids
    )[0]
    assert text == lm.tokenizer.decode(best, skip_special_tokens=True)


def test_an_empty_prompt_starts_from_bos(lm):
    (c,) = lm.complete([""], GenerateConfig(max_new_tokens=5, temperature=0))
    assert c.prompt_tokens == 1
    assert c.tokens == lm.complete([[lm.tokenizer.bos_id]], GenerateConfig(5, temperature=0))[0].tokens


def test_a_prompt_of_only_unknown_characters_is_refused(lm):
    with pytest.raises(SemillaError, match="unk"):
        lm.generate("€€€", max_new_tokens=5)
    assert isinstance(lm.generate("the €", max_new_tokens=5), str)  # some known: fine


def test_settings_are_validated(lm):
    with pytest.raises(ConfigError, match="unknown generation settings: bogus"):
        lm.generate("the", bogus=1)
    with pytest.raises(ConfigError, match="top_p"):
        lm.generate("the", top_p=1.5)
    assert lm.settings(stop="x").stop == ["x"]
    with pytest.raises(ConfigError, match="num_samples"):
        lm.generate("the", num_samples=0)


def test_completion_perplexity_is_exp_of_the_mean_negative_logprob(lm):
    (c,) = lm.complete(["the"], GenerateConfig(max_new_tokens=20, seed=0, logprobs=3, ignore_eos=True))
    assert len(c.logprobs) == len(c.tokens) == len(c.top_logprobs) == 20
    assert all(len(alts) == 3 for alts in c.top_logprobs)
    assert c.perplexity == pytest.approx(math.exp(-sum(c.logprobs) / 20))


# --- stop strings --------------------------------------------------------------------------


def stop_inside(text: str) -> tuple[str, int]:
    """A 3-character stop string first seen at index >= 3 of `text`, and that index."""
    for i in range(3, len(text) - 3):
        stop = text[i : i + 3]
        if text.find(stop) == i:
            return stop, i
    raise AssertionError(f"no usable stop string in {text!r}")


def test_a_stop_string_across_several_tokens_stops_and_is_not_emitted(lm):
    cfg = GenerateConfig(max_new_tokens=40, temperature=0, ignore_eos=True)
    (full,) = lm.complete(["the quick"], cfg)
    stop, at = stop_inside(full.text)  # three characters: three tokens of the char tokenizer
    (c,) = lm.complete(["the quick"], GenerateConfig(**{**cfg.__dict__, "stop": [stop]}))
    assert c.text == full.text[:at] and c.finish_reason == "stop"
    assert lm.tokenizer.decode(c.tokens, skip_special_tokens=True).endswith(stop)
    streamed = list(lm.stream("the quick", **{**cfg.__dict__, "stop": stop}))
    assert "".join(streamed) == full.text[:at]
    assert lm.generate("the quick", **{**cfg.__dict__, "stop": ["zzz", stop]}) == full.text[:at]


def pushes(f: StopStringFilter, tok: Tokenizer, text: str) -> list[str]:
    return [f.push(i) for i in tok.encode(text)]


def test_the_stop_filter_holds_back_a_possible_start_of_a_stop_string():
    tok = char_tokenizer()
    f = StopStringFilter(tok, ["the"])
    assert pushes(f, tok, "a th") == ["a", " ", "", ""]  # "t", "th" may become "the"
    assert pushes(f, tok, "x") == ["thx"]  # it did not: released at once
    assert pushes(f, tok, "e the") == ["e", " ", "", "", ""]
    assert f.stopped and f.flush() == ""


def test_the_stop_filter_flushes_what_it_held_at_the_end():
    tok = char_tokenizer()
    f = StopStringFilter(tok, ["the end"])
    assert "".join(pushes(f, tok, "a the en")) == "a "
    assert f.flush() == "the en" and not f.stopped


def test_the_stop_filter_waits_for_a_whole_utf8_character():
    tok = Tokenizer.train_bpe(["ñ"], vocab_size=264)  # bytes only: ñ is two tokens
    f = StopStringFilter(tok, [])
    first, second = tok.encode("ñ")
    assert f.push(first) == "" and f.push(second) == "ñ"


# --- chat and score ------------------------------------------------------------------------


def test_chat_completes_the_templated_conversation(lm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hola"}]
    reply = lm.chat(messages, max_new_tokens=20, temperature=0)
    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert reply == lm.complete([ids], GenerateConfig(20, temperature=0))[0].text
    assert ids[-1] == lm.tokenizer.token_to_id("<|assistant|>")


def test_score_is_the_models_log_likelihood(lm):
    text = "the lazy dog"
    s = lm.score(text)
    ids = torch.tensor([[lm.tokenizer.bos_id, *lm.tokenizer.encode(text)]])
    with torch.no_grad():
        lp = lm.model(ids[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None]).sum()
    assert s["tokens"] == len(text)
    assert s["log_likelihood"] == pytest.approx(float(lp), abs=1e-3)
    assert math.isfinite(s["perplexity"])
    assert s["perplexity"] == pytest.approx(math.exp(-s["log_likelihood"] / s["tokens"]))
    assert s["bits_per_char"] == pytest.approx(-s["log_likelihood"] / math.log(2) / len(text))


def test_score_covers_a_text_longer_than_the_context(lm):
    text = "the quick brown fox jumps over the lazy dog. " * 4  # 180 tokens, context 64
    s = lm.score(text)
    assert s["tokens"] == len(text)
    assert s["perplexity"] == pytest.approx(math.exp(-s["log_likelihood"] / s["tokens"]))


def test_scoring_an_empty_text_is_refused(lm):
    with pytest.raises(SemillaError, match="empty"):
        lm.score("")
