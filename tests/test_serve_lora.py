"""LoRA adapters served by name on a real server: `--lora NAME=PATH`, /v1/models with each
adapter's parent, a request naming an adapter answering as that adapter merged into its base,
vLLM's admin-only load/unload routes (audited, LRU-limited) and every bad input as one 4xx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from accounts_helpers import login, make_settings, register
from helpers import assert_one_line_error, clean_env, run_cli
from lora_helpers import merged_checkpoint, random_adapter, tiny_base
from safetensors.torch import load_file, save_file
from server_helpers import running_server

from semilla.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from semilla.serve.app import create_app
from semilla.serve.registry import load_models

PROMPT = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A base checkpoint, two adapters for it, the base with 'med' merged, and an adapter for
    another shape of model."""
    root = tmp_path_factory.mktemp("lora-serve")
    base = tiny_base(root / "base")
    other = tiny_base(root / "other", n_embd=48)
    med = random_adapter(base, root / "med", seed=1)
    return {
        "base": base,
        "med": med,
        "legal": random_adapter(base, root / "legal", targets="all-linear", r=2, seed=2),
        "merged": merged_checkpoint(base, med, root / "merged"),
        "foreign": random_adapter(other, root / "foreign", seed=3),
    }


def serve(files: dict[str, Path], tmp: Path, models=("base",), **settings):
    settings = make_settings(tmp, max_slots=4, **settings)
    return running_server(create_app(settings, load_models([(m, str(files[m])) for m in models])))


def accounts(url: str) -> tuple[dict, dict]:
    """(admin headers, user headers) of two fresh accounts (the first is the admin)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        register(client, "ana")
        register(client, "beto")
        return login(client, "ana"), login(client, "beto")


def answer(client: openai.OpenAI, model: str, max_tokens: int = 24) -> str:
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0)
    assert r.model == model
    return r.choices[0].message.content


def openai_client(url: str, headers: dict) -> openai.OpenAI:
    token = headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=60)


def test_adapters_named_at_start_answer_as_merged_into_their_base(files, tmp_path):
    lora = f"med={files['med']},legal={files['legal']}"
    with serve(files, tmp_path, models=("base", "merged"), lora=lora) as url:
        admin, user = accounts(url)
        client = openai_client(url, user)
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {"base", "merged", "med", "legal"}
        assert cards["med"].parent == cards["legal"].parent == "base"
        assert "meta" not in cards["med"].model_extra  # its path is for admins only
        assert client.models.retrieve("med").parent == "base"
        admin_cards = httpx.get(url + "/v1/models", headers=admin).json()["data"]
        assert {c["id"]: c.get("meta", {}).get("path") for c in admin_cards}["med"] == str(files["med"])

        # the oracle: the adapter merged into the base's weights, served as a model of its own
        assert answer(client, "med") == answer(client, "merged")
        assert answer(client, "med") != answer(client, "base")
        assert answer(client, "legal") not in (answer(client, "base"), answer(client, "med"))
        done = client.completions.create(model="med", prompt="the quick", max_tokens=12, temperature=0)
        twin = client.completions.create(model="merged", prompt="the quick", max_tokens=12, temperature=0)
        assert done.model == "med" and done.choices[0].text == twin.choices[0].text

        # the router resolves the name, so every protocol's routes serve the adapter alike
        ollama = httpx.post(url + "/api/chat", headers=user, timeout=60, json={
            "model": "med", "messages": PROMPT, "stream": False, "options": {"temperature": 0, "num_predict": 24}})  # fmt: skip
        assert ollama.status_code == 200 and ollama.json()["message"]["content"] == answer(client, "merged")
        assert "med" in {m["name"] for m in httpx.get(url + "/api/tags", headers=user).json()["models"]}
        anthropic = httpx.post(url + "/v1/messages", headers=user, timeout=60, json={
            "model": "med", "messages": PROMPT, "max_tokens": 24, "temperature": 0})  # fmt: skip
        assert anthropic.status_code == 200 and anthropic.json()["content"][0]["text"] == answer(
            client, "merged"
        )


def test_admins_load_and_unload_adapters_at_run_time(files, tmp_path):
    with serve(files, tmp_path, models=("base", "merged")) as url:
        admin, user = accounts(url)
        client = openai_client(url, user)
        body = {"lora_name": "med", "lora_path": str(files["med"])}
        assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 401
        r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=user)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        with pytest.raises(openai.NotFoundError):
            answer(client, "med")

        r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=admin)
        assert r.status_code == 200, r.text
        assert r.text == "Success: LoRA adapter 'med' added successfully."
        assert answer(client, "med") == answer(client, "merged")
        assert {m.id: getattr(m, "parent", None) for m in client.models.list().data}["med"] == "base"

        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "med"}, headers=admin)
        assert r.status_code == 200 and "removed" in r.text
        with pytest.raises(openai.NotFoundError) as gone:
            answer(client, "med")
        assert gone.value.body["code"] == "model_not_found"
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "med"}, headers=admin)
        assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
        assert "med" not in {m.id for m in client.models.list().data}

        actions = httpx.get(url + "/admin/audit", headers=admin).json()["data"]
        logged = [(a["action"], a["target"]) for a in actions if a["action"].startswith("lora.")]
        assert logged == [("lora.unload", "med"), ("lora.load", "med")]


def broken_adapters(files: dict[str, Path], root: Path) -> dict[str, Path]:
    """Adapter directories each wrong in one way."""
    out = {}

    def copy(name: str) -> Path:
        out[name] = Path(shutil.copytree(files["med"], root / name))
        return out[name]

    weights = copy("truncated") / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:200])
    (copy("no-config") / ADAPTER_CONFIG).unlink()
    (copy("no-weights") / ADAPTER_WEIGHTS).unlink()
    for name, change in {"rank0": {"r": 0}, "negative": {"r": -2}, "not-lora": {"peft_type": "IA3"}}.items():
        config = copy(name) / ADAPTER_CONFIG
        config.write_text(json.dumps(json.loads(config.read_text()) | change))
    weights = copy("unknown-module") / ADAPTER_WEIGHTS  # a layer this model does not have
    save_file({k.replace("q_proj", "foo_proj"): v for k, v in load_file(weights).items()}, weights)
    out["foreign"] = files["foreign"]
    out["missing"] = root / "nowhere"
    return out


def test_bad_adapters_and_names_are_one_line_4xx_and_register_nothing(files, tmp_path):
    with serve(files, tmp_path) as url:
        admin, _ = accounts(url)

        def load(name: str, path, **extra) -> httpx.Response:
            body = {"lora_name": name, "lora_path": str(path), **extra}
            return httpx.post(url + "/v1/load_lora_adapter", json=body, headers=admin, timeout=60)

        for name, path in broken_adapters(files, tmp_path).items():
            r = load(name, path)
            error = r.json()["error"]
            assert r.status_code == 400, (name, r.text)
            assert error["param"] == "lora_path" and error["code"] == "invalid_adapter"
            assert "\n" not in error["message"] and "Traceback" not in error["message"], error
        assert "has no adapter_config.json" in load("x", tmp_path / "no-config").json()["error"]["message"]
        assert "corrupt or truncated" in load("x", tmp_path / "truncated").json()["error"]["message"]

        for name in ("../med", "a/b", "", ".hidden", "a b"):
            r = load(name, files["med"])
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", (name, r.text)
        r = load("base", files["med"])  # a model's name
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        r = load("med", files["med"], base_model_name="nope")
        assert r.status_code == 404 and r.json()["error"]["param"] == "base_model_name"
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "med"}, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"

        names = {m["id"] for m in httpx.get(url + "/v1/models", headers=admin).json()["data"]}
        assert names == {"base"}
        assert load("med", files["med"]).status_code == 200
        assert load("med", files["legal"]).status_code == 409  # one name, one adapter


def stream_of(url: str, headers: dict, model: str, tokens: int = 800):
    """A streaming chat that runs for a while (min_tokens: no early stop)."""
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "min_tokens": tokens, "stream": True,
            "temperature": 0}  # fmt: skip
    return httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def streamed_tokens(lines) -> tuple[int, str | None]:
    """(content chunks, finish_reason) of an SSE stream's remaining lines."""
    chunks, finish = 0, None
    for line in lines:
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"][0]
            chunks += bool(choice["delta"].get("content"))
            finish = choice.get("finish_reason") or finish
    return chunks, finish


def test_an_adapter_unloaded_mid_stream_finishes_its_rows_and_a_full_bank_is_429(files, tmp_path):
    lora = f"med={files['med']},legal={files['legal']}"
    with serve(files, tmp_path, lora=lora, max_loras=1) as url:
        admin, user = accounts(url)
        with stream_of(url, user, "med") as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # under way
            # the one adapter slot is held by med's row: legal must wait, and is told so
            r = httpx.post(url + "/v1/chat/completions", headers=user, timeout=60,
                           json={"model": "legal", "messages": PROMPT, "max_tokens": 2})  # fmt: skip
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "adapters_busy"
            r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "med"}, headers=admin)
            assert r.status_code == 200
            chunks, finish = streamed_tokens(lines)
        assert finish == "length" and chunks > 100  # the row ran to its end with its adapter
        r = httpx.post(url + "/v1/chat/completions", headers=user, timeout=60,
                       json={"model": "legal", "messages": PROMPT, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200, r.text  # med left memory with its last row


def test_serve_refuses_a_bad_lora_flag_in_one_line(files, tmp_path):
    env = clean_env()
    r = run_cli("serve", files["base"], "--lora", "med", "--data-dir", tmp_path / "d", "--port", "0", env=env)
    assert_one_line_error(r, "--lora 'med'", "NAME=PATH")
    r = run_cli("serve", files["base"], "--lora", f"med={tmp_path / 'nope'}", "--data-dir", tmp_path / "d",
                "--port", "0", env=env)  # fmt: skip
    assert_one_line_error(r, "--lora med=", "not a directory")
    r = run_cli("serve", files["base"], "--lora", f"med={tmp_path}", "--data-dir", tmp_path / "d", "--port", "0",
                env=env)  # fmt: skip
    assert_one_line_error(r, "--lora med=", "has no adapter_config.json")
    # an adapter for another shape of model is found out once the base is loaded: the last line says so
    r = run_cli("serve", files["base"], "--lora", f"med={files['foreign']}", "--data-dir", tmp_path / "d",
                "--port", "0", env=env)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("semilla: error:") and "--lora med=" in last and "foreign" in last, last
