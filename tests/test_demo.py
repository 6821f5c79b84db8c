"""`make demo`: chat rows built from the bundled text, a context that holds a three-turn chat
over HTTP, and a demo interrupted by Ctrl+C that the next `make demo` resumes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import torch
from helpers import DEMO_TEXT, clean_env
from server_helpers import running_server

from semilla.checkpoint import save_checkpoint
from semilla.config import ModelConfig
from semilla.demo.chat_rows import MAX_CHARS, chat_rows
from semilla.models import build_model
from semilla.serve.app import create_app
from semilla.serve.registry import load_models
from semilla.serve.settings import ServerSettings
from semilla.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def demo_flags() -> dict[str, str]:
    """The training flags of the Makefile's demo, {'--block-size': '512', ...}."""
    text = (ROOT / "Makefile").read_text()
    body = re.search(r"^DEMO_TRAIN := (.*?)\n\n", text, re.S | re.M).group(1).replace("\\\n", " ")
    words = shlex.split(body)
    return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}


def test_chat_rows_are_conversations_taken_from_the_text() -> None:
    text = DEMO_TEXT.read_text(encoding="utf-8")
    vocabulary = set(re.findall(r"\w+", text))
    rows = list(chat_rows(text))
    assert len(rows) > 100
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) <= 6
        for m in row["messages"]:
            assert 0 < len(m["content"]) <= MAX_CHARS + 3
            assert set(re.findall(r"\w+", m["content"])) <= vocabulary  # the novel's words only
    assert sum(len(r["messages"]) == 6 for r in rows) > 50  # most hold three exchanges


def test_the_demo_context_holds_a_three_turn_chat_over_http(tmp_path: Path) -> None:
    """The demo's tokenizer and context length (an untrained model of that context: replies
    never stop early), three turns of max_tokens 120: no context error."""
    flags = demo_flags()
    rows = [json.dumps(r, ensure_ascii=False) for r in chat_rows(DEMO_TEXT.read_text(encoding="utf-8"))]
    tok = Tokenizer.train_bpe([DEMO_TEXT.read_text(encoding="utf-8"), *rows], int(flags["--vocab-size"]))
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, block_size=int(flags["--block-size"]), n_layer=1, n_head=2, n_embd=32
    )
    save_checkpoint(tmp_path / "demo", build_model(cfg), tok)
    app = create_app(
        ServerSettings(data_dir=str(tmp_path / "data")), load_models([("demo", str(tmp_path / "demo"))])
    )
    messages: list[dict[str, str]] = []
    with running_server(app) as url:
        for question in ("Hola, ¿quién sois?", "¿Y adónde vais por estos caminos?", "Habladme de Dulcinea."):
            messages.append({"role": "user", "content": question})
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "demo", "messages": messages, "max_tokens": 120, "seed": 1},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            messages.append(r.json()["choices"][0]["message"])
    assert len(messages) == 6


def make_demo(tmp_path: Path, **kwargs) -> subprocess.Popen:
    """The Makefile's demo training target, on a tiny model in `tmp_path`."""
    tiny = (
        f"--data {DEMO_TEXT},{tmp_path / 'chat.jsonl'} --tokenizer bpe --vocab-size 300 --preset tiny "
        "--block-size 32 --batch-size 4 --max-iters 60 --warmup-iters 2 --eval-interval 20 --eval-iters 2 "
        "--log-interval 1 --save-interval 1000 --sample-interval 1000 --device cpu --no-progress"
    )
    demo = tmp_path / "demo"
    cmd = ["make", "--no-print-directory", f"{demo}/demo-finished", f"DEMO={demo}", f"DEMO_TRAIN={tiny}"]
    cmd += [f"DEMO_CHAT={tmp_path / 'chat.jsonl'}", f"BIN={ROOT / '.venv' / 'bin'}"]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(), **kwargs
    )


def test_an_interrupted_demo_resumes_and_a_finished_one_is_kept(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    proc = make_demo(tmp_path, start_new_session=True)
    lines = []
    for line in proc.stdout:  # Ctrl+C in the terminal: SIGINT to make and the trainer
        lines.append(line)
        if line.startswith("step 5 train"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert re.match(r"semilla: training the demo model: about \d+ minutes", lines[0]), lines[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # make leaves at once; the trainer saves, then exits
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    assert proc.returncode != 0
    assert not (demo / "demo-finished").exists()  # best/ may exist: it does not mean done
    stopped = json.loads((demo / "last" / "trainer_state.json").read_text())["step"]
    assert 5 <= stopped < 60

    again = make_demo(tmp_path)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert f"resumed from step {stopped}" in out
    assert json.loads((demo / "last" / "trainer_state.json").read_text())["step"] == 60
    assert (demo / "demo-finished").is_file()

    done = make_demo(tmp_path)
    out = done.communicate(timeout=60)[0]
    assert done.returncode == 0 and "is up to date" in out and "semilla train" not in out, out
