"""Chat: the ChatSession commands, the REPL's input, and `semilla chat` with a model trained
on chat JSONL answering in turn."""

from __future__ import annotations

import builtins
import io
import json

import pytest
from generation_helpers import tiny_lm
from helpers import run_cli

import semilla
from semilla.config import GenerateConfig, ModelConfig, TrainConfig
from semilla.generate import generate
from semilla.repl import ChatSession, read_message

PAIRS = [
    ("hola", "buenos dias"),
    ("adios", "hasta luego"),
    ("gracias", "de nada"),
    ("que tal", "muy bien"),
    ("hello", "hi there"),
    ("bye", "see you"),
]
GREEDY = GenerateConfig(max_new_tokens=40, temperature=0)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny llama trained for 200 steps (a few seconds) on short chat exchanges."""
    from semilla.train import train

    root = tmp_path_factory.mktemp("chat")
    rows = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in PAIRS
    ] * 10
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(
        ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
        TrainConfig(
            data=str(root / "chat.jsonl"), out_dir=str(root / "run"), max_iters=200,
            batch_size=16, learning_rate=1e-2, min_lr=1e-3, warmup_iters=10,
            eval_interval=200, eval_iters=2, log_interval=200, save_interval=200,
            sample_interval=200, device="cpu", progress=False,
        ),
    )  # fmt: skip
    return root / "run"


@pytest.fixture(scope="module")
def chat_lm(chat_run):
    return semilla.load(str(chat_run), device="cpu")


@pytest.fixture
def session():
    return ChatSession(tiny_lm(), GenerateConfig(max_new_tokens=8, temperature=0.8, seed=0))


# --- commands ------------------------------------------------------------------------------


def test_set_changes_a_sampling_setting(session):
    assert session.command("/set temperature 0.7") == "(temperature = 0.7)"
    assert session.cfg.temperature == 0.7
    assert session.command("/set top_k 40") == "(top_k = 40)" and session.cfg.top_k == 40
    assert session.command("/set seed none") == "(seed = None)" and session.cfg.seed is None


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        ("/set bogus 1", "unknown setting 'bogus'"),
        ("/set stop x", "unknown setting 'stop'"),
        ("/set top_p 0", "error: invalid generation settings: top_p must be in (0, 1]"),
        ("/set temperature warm", "error: expected a number, got 'warm'"),
    ],
)
def test_a_bad_set_explains_itself_and_changes_nothing(session, line, answer):
    before = session.cfg
    assert session.command(line).startswith(answer)
    assert session.cfg == before


def test_system_reset_and_save(session, tmp_path):
    assert session.command("/system You answer in Spanish.") == "(system prompt set)"
    session.messages += [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hola"},
    ]
    path = tmp_path / "conversation.json"
    assert session.command(f"/save {path}") == f"(saved 3 messages to {path})"
    saved = json.loads(path.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[0]["content"] == "You answer in Spanish."
    assert session.command("/reset") == "(conversation cleared)"
    assert session.conversation() == [{"role": "system", "content": "You answer in Spanish."}]
    assert session.command("/system") == "(system prompt removed)"
    assert session.conversation() == []


def test_save_reports_problems_instead_of_raising(session, tmp_path):
    assert session.command("/save") == "usage: /save FILE"
    answer = session.command(f"/save {tmp_path / 'missing' / 'c.json'}")
    assert answer.startswith("error: cannot write")


def test_help_settings_and_unknown_commands(session):
    assert "/set NAME VALUE" in session.command("/help")
    assert "  temperature = 0.8" in session.command("/settings").splitlines()
    assert session.command("/frobnicate") == "unknown command /frobnicate; /help lists them"


# --- replies -------------------------------------------------------------------------------


def test_a_reply_is_streamed_and_kept_in_the_history(session, monkeypatch):
    prompts = []
    chat_ids = session.lm.chat_ids

    def spy(messages):
        prompts.append(list(messages))
        return chat_ids(messages)

    monkeypatch.setattr(session.lm, "chat_ids", spy)
    out = io.StringIO()
    first = session.reply("hi", out)
    assert out.getvalue() == first + "\n"
    session.reply("again", io.StringIO())
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first}]
    assert prompts[1][:2] == turn  # the second reply sees the first exchange


def test_ctrl_c_stops_the_reply_but_not_the_chat(session, monkeypatch):
    def interrupted(ids, cfg):
        yield "half an"
        raise KeyboardInterrupt

    monkeypatch.setattr(session.lm, "stream_ids", interrupted)
    out = io.StringIO()
    assert session.reply("tell me", out) == "half an"
    assert out.getvalue() == "half an [stopped]\n"
    assert session.messages[-1] == {"role": "assistant", "content": "half an"}


def test_a_trailing_backslash_continues_the_message(monkeypatch):
    lines = iter(["first line\\", "second line", "next"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert read_message() == "first line\nsecond line"
    assert read_message() == "next"

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr(builtins, "input", eof)
    assert read_message() is None


# --- a model trained on chat JSONL ---------------------------------------------------------


def test_a_chat_model_answers_in_turn_and_stops_at_end_of_turn(chat_lm):
    tok = chat_lm.tokenizer
    for user, answer in PAIRS[:3]:
        ids = chat_lm.chat_ids([{"role": "user", "content": user}])
        (c,) = chat_lm.complete([ids], GREEDY)
        assert c.text.strip() and c.finish_reason == "stop"
        assert len(c.tokens) < GREEDY.max_new_tokens
        assert c.text == answer  # it learned the exchanges
        # the token that ended the reply is the end-of-turn token
        (free,) = generate(chat_lm.model, [ids], GREEDY, stop_ids=[])
        assert free.tokens[: len(c.tokens)] == c.tokens
        assert free.tokens[len(c.tokens)] == tok.end_id


def test_chat_session_with_the_trained_model(chat_lm):
    session = ChatSession(chat_lm, GREEDY, system=None)
    assert session.reply("adios", io.StringIO()) == "hasta luego"
    assert chat_lm.chat([{"role": "user", "content": "bye"}], temperature=0) == "see you"


def test_semilla_chat_reads_stdin_and_saves_the_conversation(chat_run, tmp_path):
    saved = tmp_path / "f.json"
    proc = run_cli(
        "chat", chat_run, "--temperature", "0", "--system", "be kind",
        input=f"hola\n/set max_new_tokens 30\ngracias\n/save {saved}\n/quit\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "hola" and messages[3]["content"] == "gracias"
    assert all(m["content"].strip() for m in messages)
    assert "buenos dias" in proc.stdout and "(max_new_tokens = 30)" in proc.stdout
