"""The authorization matrix on the real server: every route (the model routes, /metrics kept
private, the accounts routes) x {anonymous, user, other user, admin}.

"other" is a second user who owns nothing of "user"'s: reading or changing by id answers 404.
Accounts exist, so anonymous callers get 401 on the model routes too.
"""

from __future__ import annotations

import httpx
import pytest
from accounts_helpers import build_app, chat, login, make_settings, register, serve

# (method, path, json, {role: expected status}); {fid}, {cid}, {kid}, {uid} belong to "user"
A, U, X, D = "anonymous", "user", "other", "admin"
HOLA = [{"role": "user", "content": "Hola"}]
MATRIX = [
    ("GET", "/health", None, {A: 200, U: 200, X: 200, D: 200}),
    ("GET", "/ready", None, {A: 200, U: 200, X: 200, D: 200}),
    ("GET", "/metrics", None, {A: 401, U: 403, X: 403, D: 200}),  # metrics_public=False
    ("GET", "/v1/models", None, {A: 401, U: 200, X: 200, D: 200}),
    ("GET", "/v1/models/tiny", None, {A: 401, U: 200, X: 200, D: 200}),
    ("GET", "/v1/models/nope", None, {A: 401, U: 404, X: 404, D: 404}),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": HOLA, "max_tokens": 2},
        {A: 401, U: 200, X: 200, D: 200},
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": HOLA, "max_tokens": 2, "stream": True},
        {A: 401, U: 200, X: 200, D: 200},
    ),
    (
        "POST",
        "/v1/completions",
        {"model": "tiny", "prompt": "Hola", "max_tokens": 2},
        {A: 401, U: 200, X: 200, D: 200},
    ),
    ("POST", "/v1/generate", {"text": "Hola", "max_length": 2}, {A: 401, U: 200, X: 200, D: 200}),
    ("POST", "/predict", {"prompt": "Hola", "max_length": 2}, {A: 401, U: 200, X: 200, D: 200}),
    ("GET", "/auth/me", None, {A: 401, U: 200, X: 200, D: 200}),
    ("GET", "/v1/keys", None, {A: 401, U: 200, X: 200, D: 200}),
    ("POST", "/v1/keys", {"name": "k"}, {A: 401, U: 201, X: 201, D: 201}),
    ("DELETE", "/v1/keys/{kid}", None, {A: 401, U: 204, X: 404, D: 404}),
    ("POST", "/feedback", {"rating": 1, "text": "ok"}, {A: 401, U: 201, X: 201, D: 201}),
    ("POST", "/feedback", {"rating": 1, "completion_id": "{cmpl}"}, {A: 401, U: 201, X: 404, D: 404}),
    ("GET", "/feedback", None, {A: 401, U: 200, X: 200, D: 200}),
    ("GET", "/feedback/{fid}", None, {A: 401, U: 200, X: 404, D: 404}),
    ("GET", "/v1/conversations", None, {A: 401, U: 200, X: 200, D: 200}),
    ("POST", "/v1/conversations", {"title": "t"}, {A: 401, U: 201, X: 201, D: 201}),
    ("GET", "/v1/conversations/{cid}", None, {A: 401, U: 200, X: 404, D: 404}),
    ("PATCH", "/v1/conversations/{cid}", {"title": "x"}, {A: 401, U: 200, X: 404, D: 404}),
    ("DELETE", "/v1/conversations/{cid}", None, {A: 401, U: 204, X: 404, D: 404}),
    ("GET", "/training/runs", None, {A: 401, U: 200, X: 200, D: 200}),
    ("GET", "/training/latest", None, {A: 401, U: 404, X: 404, D: 404}),
    ("GET", "/training/runs/nope/metrics", None, {A: 401, U: 404, X: 404, D: 404}),
    ("GET", "/admin/users", None, {A: 401, U: 403, X: 403, D: 200}),
    ("PATCH", "/admin/users/{uid}", {"role": "user"}, {A: 401, U: 403, X: 403, D: 200}),
    ("GET", "/admin/keys", None, {A: 401, U: 403, X: 403, D: 200}),
    ("DELETE", "/admin/keys/{kid}", None, {A: 401, U: 403, X: 403, D: 204}),
    ("GET", "/admin/cache", None, {A: 401, U: 403, X: 403, D: 200}),
    ("DELETE", "/admin/cache", None, {A: 401, U: 403, X: 403, D: 200}),
    ("GET", "/admin/audit", None, {A: 401, U: 403, X: 403, D: 200}),
    ("GET", "/admin/feedback", None, {A: 401, U: 403, X: 403, D: 200}),
    ("POST", "/admin/retention", None, {A: 401, U: 403, X: 403, D: 200}),
    ("POST", "/admin/reload", None, {A: 401, U: 403, X: 403, D: 200}),
    ("POST", "/auth/logout", None, {A: 401, U: 204, X: 204, D: 204}),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_run):
    tmp = tmp_path_factory.mktemp("matrix")
    with (
        serve(build_app(make_settings(tmp, metrics_public=False), tiny_run)) as url,
        httpx.Client(base_url=url, timeout=30) as c,
    ):
        register(c, "root")  # first account: admin
        register(c, "ana")
        register(c, "eve")
        tokens = {U: login(c, "ana"), X: login(c, "eve"), D: login(c, "root")}
        c.cookies.clear()
        yield c, tokens


def fresh_objects(c: httpx.Client, h: dict) -> dict[str, str]:
    """New objects owned by "user" for one row (deleting rows must not spoil the next)."""
    cmpl = chat(c, h, "mine").json()["id"]
    return {
        "kid": str(c.post("/v1/keys", headers=h, json={"name": "k"}).json()["id"]),
        "cid": c.post("/v1/conversations", headers=h, json={"title": "t"}).json()["id"],
        "fid": str(c.post("/feedback", headers=h, json={"rating": 5}).json()["id"]),
        "cmpl": cmpl,
        "uid": "2",
    }


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"), MATRIX, ids=[f"{m} {p}" for m, p, *_ in MATRIX]
)
def test_authorization_matrix(world, method, path, body, expected):
    c, tokens = world
    for role, want in expected.items():
        if path == "/auth/logout":  # ends the session it is called with: fresh ones each time
            tokens = {U: login(c, "ana"), X: login(c, "eve"), D: login(c, "root")}
            c.cookies.clear()
        owner = tokens[U]
        headers = {A: {}, **tokens}[role]
        ids = fresh_objects(c, owner)
        url = path.format(**ids)
        payload = (
            {k: (v.format(**ids) if isinstance(v, str) else v) for k, v in body.items()} if body else None
        )
        r = c.request(method, url, headers=headers, json=payload)
        assert r.status_code == want, f"{role}: {method} {url} -> {r.status_code} {r.text}"
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
