"""Evaluation: held-out likelihood, sample metrics with known answers, the report and `semilla eval`."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from generation_helpers import TEXT, char_tokenizer, tiny_lm, tiny_model
from helpers import assert_one_line_error, run_cli

from semilla.checkpoint import save_checkpoint
from semilla.config import GenerateConfig
from semilla.errors import DataError
from semilla.evaluate import (
    compare,
    distinct_n,
    evaluate,
    format_report,
    likelihood_metrics,
    load_eval_tokens,
    readability,
    repetition_rate,
    self_bleu,
    text_tokens,
    token_entropy,
    token_windows,
)

SMALL_EVAL = dict(num_samples=2, references=2, prompt_tokens=8, reference_tokens=8)
SMALL_EVAL_FLAGS = ["--num-samples", "2", "--references", "2", "--prompt-tokens", "8"]
SMALL_EVAL_FLAGS += ["--reference-tokens", "8", "--max-new-tokens", "10"]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "held_out.txt"
    path.write_text(TEXT * 2, encoding="utf-8")  # 236 characters
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two different tiny checkpoints over the same tokenizer."""
    tok = char_tokenizer()
    root = tmp_path_factory.mktemp("eval_ckpts")
    for seed in (0, 1):
        save_checkpoint(root / f"model{seed}", tiny_model(tok, seed), tok)
    return root / "model0", root / "model1"


# --- held-out likelihood -------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [2, 9, 33, 64, 100])
@pytest.mark.parametrize("stride", [1, 3, 8, 16, 50])
def test_token_windows_score_every_target_exactly_once(n_tokens, stride):
    ids = torch.arange(n_tokens)
    block = 16
    scored = []
    for window, n_new in token_windows(ids, block, stride):
        assert 1 <= n_new <= len(window) - 1 <= block  # fits the context
        scored += window[-n_new:].tolist()  # targets of the last n_new positions
    assert scored == list(range(1, n_tokens))


def test_likelihood_on_a_text_file_matches_a_plain_forward(lm, eval_file):
    ids, chars, _ = load_eval_tokens(lm, str(eval_file), "test")
    assert chars == len(TEXT) * 2 and len(ids) == chars + 1  # <bos> + one token per char
    head = ids[:60]  # fits one window: the metrics are plain cross-entropy
    m = likelihood_metrics(lm, head, n_chars=59)
    with torch.no_grad():
        logits = lm.model(head[None, :-1])[0]
    ce = float(F.cross_entropy(logits, head[1:]))
    assert m["tokens"] == 59
    assert m["cross_entropy"] == pytest.approx(ce, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    accuracy = float((logits.argmax(-1) == head[1:]).float().mean())
    assert m["token_accuracy"] == pytest.approx(accuracy)
    assert m["bits_per_char"] == pytest.approx(ce * 59 / math.log(2) / 59)


@pytest.mark.parametrize("stride", [None, 16])
def test_likelihood_metrics_are_consistent_over_many_windows(lm, eval_file, stride):
    ids, chars, _ = load_eval_tokens(lm, str(eval_file), "test")
    m = likelihood_metrics(lm, ids, chars, stride=stride)
    assert m["tokens"] == len(ids) - 1
    assert m["perplexity"] == pytest.approx(math.exp(m["cross_entropy"]))
    assert 0 <= m["token_accuracy"] <= m["top5_accuracy"] <= 1
    nll = m["cross_entropy"] * m["tokens"]
    assert m["bits_per_char"] == pytest.approx(nll / math.log(2) / chars)


def test_max_tokens_scores_only_the_beginning(lm, eval_file):
    ids, chars, _ = load_eval_tokens(lm, str(eval_file), "test")
    m = likelihood_metrics(lm, ids, chars, max_tokens=50)
    assert m["tokens"] == 50


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_an_empty_eval_file_is_a_data_error(lm, tmp_path, content):
    (tmp_path / "empty.txt").write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_eval_tokens(lm, str(tmp_path / "empty.txt"), "test")


def test_a_missing_eval_file_is_a_data_error(lm, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_eval_tokens(lm, str(tmp_path / "nope.txt"), "test")


# --- sample metrics with known answers -----------------------------------------------------


def test_distinct_n_counts_unique_ngrams_over_all_samples():
    assert distinct_n([["a", "b", "a", "b"]], 1) == 0.5  # a, b of 4
    assert distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n([["a", "b"], ["a", "c"]], 1) == 0.75  # a, b, c of 4
    assert distinct_n([["a"]], 2) == 0.0  # no bigram at all


def test_repetition_rate_counts_ngrams_repeating_within_a_sample():
    assert repetition_rate([list("abcabc")], 3) == 0.25  # abc, bca, cab, abc
    assert repetition_rate([list("abcd"), list("abcd")], 3) == 0.0  # across samples is fine
    assert repetition_rate([list("aaaa")], 2) == pytest.approx(2 / 3)
    assert repetition_rate([list("ab")], 4) == 0.0


def test_token_entropy_in_bits():
    assert token_entropy([[1, 1, 2, 2]]) == pytest.approx(1.0)
    assert token_entropy([[1, 2], [3, 4]]) == pytest.approx(2.0)
    assert token_entropy([[7, 7, 7]]) == 0.0
    assert token_entropy([]) == 0.0


def test_self_bleu_is_high_for_copies_and_zero_for_disjoint_texts():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100.0)
    assert self_bleu(["a b c d e", "f g h i j"]) == pytest.approx(0.0)
    assert self_bleu(["only one"]) == 0.0
    texts = ["the cat sat on the mat", "the cat sat on a hat", "a dog ran in the park"]
    expected = sum(sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts))
    assert self_bleu(texts) == pytest.approx(expected / 3)


def test_readability_is_flesch_for_english():
    # 12 one-syllable words in 2 sentences
    r = readability("The cat sat on the mat. The dog ran to the sun.")
    assert r["language"] == "en"
    assert r["flesch_reading_ease"] == pytest.approx(206.835 - 1.015 * 6 - 84.6 * 1, abs=0.01)


def test_readability_is_fernandez_huerta_for_spanish():
    # 11 words, 16 syllables (per-rro, co-me, car-ne, ca-sa, ma-dre), 2 sentences
    r = readability("El perro come la carne. La casa es de mi madre.")
    assert r["language"] == "es" and "flesch_reading_ease" not in r
    expected = 206.84 - 60 * 16 / 11 - 1.02 * (100 / 5.5)
    assert r["fernandez_huerta"] == pytest.approx(expected, abs=0.01)


def test_readability_of_text_without_words_is_empty():
    assert readability("123 456 !!") == {}


# --- the report ----------------------------------------------------------------------------


def test_evaluate_reports_every_section(lm, eval_file):
    cfg = GenerateConfig(max_new_tokens=10, seed=0, temperature=0.8)
    report = evaluate(lm, str(eval_file), cfg=cfg, prompts=["the", "En"], **SMALL_EVAL)
    assert set(report) == {"checkpoint", "data", "settings", "likelihood", "samples", "references"}
    assert report["settings"]["temperature"] == 0.8 and report["settings"]["max_new_tokens"] == 10
    assert set(report["likelihood"]) >= {"perplexity", "cross_entropy", "token_accuracy"}
    samples = report["samples"]
    assert samples["samples"] == 4  # 2 prompts x 2 samples
    for key in ("distinct_1", "distinct_2", "repetition_rate_4gram"):
        assert 0 <= samples[key] <= 1
    assert samples["token_entropy_bits"] >= 0 and samples["mean_length_tokens"] <= 10
    assert report["references"]["pairs"] == 2
    assert 0 <= report["references"]["bleu"] <= 100 and 0 <= report["references"]["chrf"] <= 100
    table = format_report([report, report])
    assert "likelihood.perplexity" in table and "references.chrf" in table
    header = next(line for line in table.splitlines() if line.startswith("metric"))
    assert len(header.split()) == 3  # metric + two columns
    assert table.startswith(f"data: {eval_file}\nsampling: max_new_tokens 10, temperature 0.8")


def test_evaluate_can_skip_samples_and_references(lm, eval_file):
    report = evaluate(lm, str(eval_file), num_samples=0, references=0)
    assert set(report) == {"checkpoint", "data", "settings", "likelihood"}


def test_reference_scoring_needs_enough_text(lm, tmp_path):
    (tmp_path / "short.txt").write_text("the end.")
    with pytest.raises(DataError, match="reference scoring needs"):
        evaluate(lm, str(tmp_path / "short.txt"), num_samples=0, references=2)


# --- the command ---------------------------------------------------------------------------


def test_eval_prints_a_json_report_and_saves_it(checkpoints, eval_file, tmp_path):
    out = tmp_path / "report.json"
    proc = run_cli("eval", checkpoints[0], "--data", eval_file, "--json", "-o", out, *SMALL_EVAL_FLAGS)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"likelihood", "samples", "references"} <= set(report)
    assert report["checkpoint"] == str(checkpoints[0])
    assert json.loads(out.read_text()) == report


def test_eval_compare_reports_both_checkpoints(checkpoints, eval_file):
    proc = run_cli(
        "eval", checkpoints[0], "--compare", checkpoints[1], "--data", eval_file, "--json",
        "--num-samples", "0", "--references", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout)["compare"]
    assert [r["checkpoint"] for r in reports] == [str(c) for c in checkpoints]
    first, second = (r["likelihood"]["perplexity"] for r in reports)
    assert first != second  # two models, two scores


def test_eval_of_an_empty_file_is_a_one_line_error(checkpoints, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = run_cli("eval", checkpoints[0], "--data", tmp_path / "empty.txt")
    assert_one_line_error(proc, "empty")


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A prepared dataset, a char model with its tokenizer and a BPE model with another one."""
    from semilla.data import prepare
    from semilla.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("two_tokenizers")
    (root / "text.txt").write_text(TEXT * 20, encoding="utf-8")
    prepare([str(root / "text.txt")], str(root / "data"))
    char = Tokenizer.load(root / "data")
    bpe = Tokenizer.train_bpe([TEXT * 20], 300)
    save_checkpoint(root / "char", tiny_model(char, 0), char)
    save_checkpoint(root / "bpe", tiny_model(bpe, 1), bpe)
    return root


def test_compare_scores_both_models_on_the_same_text_in_bits_per_char(two_tokenizers):
    from semilla.api import load
    from semilla.evaluate import eval_text

    root = two_tokenizers
    lms = [load(str(root / "char")), load(str(root / "bpe"))]
    result = compare(lms, str(root / "data"), "val", num_samples=0, references=0)
    assert "bits_per_char" in result["note"]
    reports = result["compare"]
    assert reports[0]["data"] == reports[1]["data"] == f"{root / 'data'} (val split)"
    text, _ = eval_text(str(root / "data"), "val")
    for lm, report in zip(lms, reports, strict=True):  # each through its own tokenizer, same characters
        expected = likelihood_metrics(lm, text_tokens(lm, text), len(text))
        assert report["likelihood"]["bits_per_char"] == pytest.approx(expected["bits_per_char"])
    assert reports[0]["likelihood"]["tokens"] != reports[1]["likelihood"]["tokens"]


def test_eval_compare_prints_what_it_measured(two_tokenizers):
    root = two_tokenizers
    proc = run_cli(
        "eval", root / "char", "--compare", root / "bpe", "--data", root / "data", "--split", "val",
        "--num-samples", "0", "--references", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.splitlines()[:3]
    assert head[0] == f"data: {root / 'data'} (val split)"
    assert head[1].startswith("sampling: max_new_tokens 100, temperature 0.8, top_k 40")
    assert head[2].startswith("note: the models' tokenizers differ")
