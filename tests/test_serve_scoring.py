"""Prompt scoring through /v1/completions as OpenAI's legacy API had it (echo + logprobs: one
log-probability per prompt token, the first null; max_tokens 0; prompts as token-id lists), and
lm-evaluation-harness's `local-completions` model scoring a multiple-choice task against it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
from server_helpers import running_server

from semilla.checkpoint import save_checkpoint
from semilla.config import ModelConfig
from semilla.models import build_model
from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings
from semilla.tokenizer import Tokenizer

BLOCK = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_text: str) -> Path:
    torch.manual_seed(0)
    tok = Tokenizer.train_char([corpus_text])
    model = build_model(
        ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
    )
    return save_checkpoint(tmp_path_factory.mktemp("scoring") / "char", model, tok)


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory):
    many = {"anonymous": 10**6, "user": 10**6, "admin": 10**6}
    settings = ServerSettings(
        data_dir=str(tmp_path_factory.mktemp("data")), rate_limit_rpm=many, rate_limit_tpm=many
    )
    with running_server(create_app(settings, load_models([("char", str(checkpoint))]))) as url:
        yield url


@pytest.fixture(scope="module")
def direct(checkpoint: Path):
    """Log-probabilities by a plain forward pass of the checkpoint: the oracle."""
    import semilla

    lm = semilla.load(str(checkpoint))

    def logprobs(ids: list[int]) -> list[float]:
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids[:-1]])).float()
        return logits.log_softmax(-1)[0].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()

    return lm.tokenizer, logprobs


def test_echo_scores_every_prompt_token_the_first_null(server: str, direct):
    tok, logprobs = direct
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    text = "En un lugar de la Mancha"
    r = client.completions.create(model="char", prompt=text, echo=True, logprobs=2, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == list(text) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(logprobs(tok.encode(text)), abs=1e-4)
    assert lp.text_offset == list(range(len(text)))
    assert all(
        len(top) == 2 and max(top.values()) >= chosen
        for top, chosen in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True)
    )
    # echo with generated tokens: the prompt's scores, then the answer's
    r = client.completions.create(
        model="char", prompt=text, echo=True, logprobs=0, max_tokens=5, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(text) + r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text


def test_prompts_as_token_id_lists(server: str, direct):
    tok, logprobs = direct
    prompts = [tok.encode("Sancho"), tok.encode("Dulcinea del Toboso")]
    body = {
        "model": "char",
        "prompt": prompts,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0,
    }
    r = httpx.post(server + "/v1/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for ids, choice in zip(prompts, r["choices"], strict=True):
        assert choice["text"].startswith(tok.decode(ids))
        scored = choice["logprobs"]["token_logprobs"]
        assert scored[0] is None and scored[1 : len(ids)] == pytest.approx(logprobs(ids), abs=1e-4)
        assert len(scored) == len(ids) + 1  # and the one generated token
    plain = httpx.post(
        server + "/v1/completions", json={"model": "char", "prompt": prompts, "max_tokens": 0}
    ).json()
    assert [c["text"] for c in plain["choices"]] == ["", ""]


def test_token_ids_outside_the_vocabulary_are_400(server: str):
    r = httpx.post(server + "/v1/completions", json={"model": "char", "prompt": [[1, 2], [10**9]]})
    assert r.status_code == 400 and "token ids must be in" in r.json()["error"]["message"], r.text


QUESTIONS = [
    ("En un lugar de la", ["Mancha", "casa", "sierra"], 0),
    ("Don Quijote y", ["Sancho", "Dulcinea", "el cura"], 0),
    ("el ingenioso hidalgo", ["don Quijote", "Rocinante", "caballero"], 1),
    ("de cuyo nombre no quiero", ["acordarme", "decirlo", "saber"], 0),
    ("su rocín", ["flaco", "gordo", "blanco"], 2),
    ("y galgo", ["corredor", "lento", "viejo"], 0),
]


@pytest.mark.slow  # about 40 s: lm-eval's imports and dataset loading
def test_lm_eval_local_completions_equals_semillas_own_scoring(
    server: str, checkpoint: Path, direct, tmp_path: Path
):
    """lm-evaluation-harness, model local-completions with its default tokenized requests, on a
    multiple-choice task read from a local JSONL file: its loglikelihoods are a plain forward
    pass's within 1e-4, and its accuracy the one computed from them."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tok, logprobs = direct
    data = tmp_path / "mc.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
            for q, c, a in QUESTIONS
        ),
        encoding="utf-8",
    )
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "quijote_mc.yaml").write_text(
        "task: quijote_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    model_args = {
        "base_url": server + "/v1/completions", "model": "char", "tokenizer": str(checkpoint),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": BLOCK - 1, "num_concurrent": 1,
    }  # fmt: skip
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=["quijote_mc"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True,
    )  # fmt: skip
    samples = sorted(out["samples"]["quijote_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for sample, (question, choices, answer) in zip(samples, QUESTIONS, strict=True):
        ours = []
        for choice in choices:
            context, whole = tok.encode(question), tok.encode(question + " " + choice)
            ours.append(sum(logprobs(whole)[len(context) - 1 :]))  # the continuation's tokens
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct += max(range(len(ours)), key=ours.__getitem__) == answer
    assert out["results"]["quijote_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))


def test_logprobs_never_spell_text_cut_by_a_stop_string(server: str):
    """Whole, streamed and replayed from the cache: the tokens' texts are the content."""
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    kw = dict(
        model="char",
        messages=[{"role": "user", "content": "Hola"}],
        max_tokens=60,
        temperature=0,
        logprobs=True,
    )
    free = client.chat.completions.create(**kw).choices[0].message.content
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # a stop string in the middle of the answer
    kw["stop"] = [stop]
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "stop" and whole.message.content == free[: free.index(stop)]
    assert "".join(t.token for t in whole.logprobs.content) == whole.message.content
    for _ in range(2):  # the second is a replay of the cached answer
        chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
        streamed = [t.token for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert "".join(streamed) == whole.message.content
    legacy = client.completions.create(
        model="char", prompt="Hola", max_tokens=60, temperature=0, logprobs=1, stop=[stop]
    )
    text = legacy.choices[0].text
    assert "".join(legacy.choices[0].logprobs.tokens) == text and stop not in text


def test_a_scored_result_round_trips_through_the_shared_cache_codec():
    """Replicas share cached answers through Redis as JSON: prompt scores survive the trip."""
    from semilla.serve.accounts.shared import decode_result, encode_result
    from semilla.serve.serving import Choice, Result, TokenInfo

    first, second = TokenInfo("E", None, []), TokenInfo("n", -1.5, [("n", -1.5), ("a", -2.0)])
    choice = Choice(0, "x", tokens=[TokenInfo("x", -0.5, [("x", -0.5)])], n_tokens=2, finish_reason="stop")
    choice.pending = [TokenInfo("y", -3.0, [])]
    result = Result([choice], prompt_tokens=2, prompt_logprobs=[[first, second]])
    assert decode_result(encode_result(result)) == result
