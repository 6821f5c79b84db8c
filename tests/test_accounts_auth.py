"""Authentication over real HTTP: open mode, tokens, keys, cookies and the attacks on them."""

from __future__ import annotations

import base64
import json
import time

import httpx
import jwt
import pytest
from accounts_helpers import SECRET, build_app, chat, login, make_settings, register, serve

from semilla.serve.accounts import StartupPolicyError, check_startup_policy


@pytest.fixture
def server(tmp_path, tiny_run):
    with (
        serve(build_app(make_settings(tmp_path), tiny_run)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client


def complete(client, headers=None, **body):
    """A real chat completion from the tiny model."""
    return chat(client, headers, **body)


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code:
        assert err["code"] == code


def test_open_on_loopback_until_the_first_account_then_closed(server):
    assert complete(server).status_code == 200
    user = register(server, "ana")
    assert user["role"] == "admin"  # the first account is admin
    assert register(server, "bob")["role"] == "user"
    assert_error(complete(server), 401)
    assert complete(server, login(server, "bob")).status_code == 200


def test_keys_as_bearer_and_x_api_key_shown_once_and_revocable(server):
    register(server, "ana")
    h = login(server, "ana")
    created = server.post("/v1/keys", headers=h, json={"name": "app", "expires_in_days": 30}).json()
    key = created["key"]
    assert key.startswith("sk-") and created["expires_at"]
    listed = server.get("/v1/keys", headers=h).json()["data"]
    assert "key" not in listed[0] and key not in json.dumps(listed)  # never shown again
    assert listed[0]["last_used_at"] is None
    assert complete(server, {"Authorization": f"Bearer {key}"}).status_code == 200
    assert server.get("/v1/keys", headers=h).json()["data"][0]["last_used_at"]
    assert complete(server, {"X-API-Key": key}).status_code == 200
    assert_error(server.get("/v1/keys", headers={"X-API-Key": key}), 403)  # keys cannot mint keys
    assert server.delete(f"/v1/keys/{created['id']}", headers=h).status_code == 204
    assert_error(complete(server, {"X-API-Key": key}), 401)
    assert_error(complete(server, {"X-API-Key": "sk-" + "A" * 43}), 401)


def test_login_sets_a_secure_session_cookie_and_logout_ends_it(server):
    register(server, "ana")
    r = server.post("/auth/login", data={"username": "ana", "password": "correct horse battery"})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax") and "Secure" not in cookie
    assert server.get("/auth/me").json()["username"] == "ana"  # the client sends the cookie back
    token = r.json()["access_token"]
    assert server.post("/auth/logout", headers={"Authorization": f"Bearer {token}"}).status_code == 204
    server.cookies.clear()
    assert_error(server.get("/auth/me", headers={"Authorization": f"Bearer {token}"}), 401)


def test_guessing_keys_is_throttled_like_logins(tmp_path, tiny_run):
    with serve(build_app(make_settings(tmp_path, auth_attempts_per_minute=5), tiny_run)) as url:
        c = httpx.Client(base_url=url)
        register(c, "ana")  # accounts exist: no open mode
        statuses = [
            c.get("/v1/models", headers={"X-API-Key": f"sk-guess{i:040d}"}).status_code for i in range(8)
        ]
        assert statuses[:4] == [401] * 4 and statuses[-1] == 429


def test_cookie_sessions_refuse_cross_site_writes(server):
    register(server, "ana")
    server.post("/auth/login", data={"username": "ana", "password": "correct horse battery"})
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hola"}], "max_tokens": 2}
    forged = server.post("/v1/chat/completions", json=body, headers={"Sec-Fetch-Site": "cross-site"})
    assert_error(forged, 403)
    assert_error(server.post("/auth/logout", headers={"Sec-Fetch-Site": "same-site"}), 403)
    assert (
        server.get("/auth/me", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    )  # reads are fine
    own_page = server.post("/v1/chat/completions", json=body, headers={"Sec-Fetch-Site": "same-origin"})
    assert own_page.status_code == 200
    assert server.post("/auth/logout", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 204


def test_production_cookie_is_secure(tmp_path, tiny_run):
    with serve(build_app(make_settings(tmp_path, environment="production"), tiny_run)) as url:
        c = httpx.Client(base_url=url)
        register(c, "ana")
        r = c.post("/auth/login", data={"username": "ana", "password": "correct horse battery"})
        assert "Secure" in r.headers["set-cookie"]


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_forged_tampered_expired_and_premature_tokens_are_401(server):
    register(server, "ana")
    register(server, "bob")
    good = login(server, "bob")["Authorization"].split()[1]
    header, payload, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    now = int(time.time())
    forged = {
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims | {'sub': '1'})}.",
        "tampered payload": f"{header}.{_b64(claims | {'sub': '1'})}.{sig}",
        "wrong signature": jwt.encode(claims | {"sub": "1"}, "y" * 48, algorithm="HS256"),
        "expired": jwt.encode(claims | {"iat": now - 7200, "exp": now - 3600}, SECRET, algorithm="HS256"),
        "nbf in the future": jwt.encode(claims | {"nbf": now + 3600}, SECRET, algorithm="HS256"),
        "no exp": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, SECRET, algorithm="HS256"),
        "garbage": "not.a.token",
    }
    for name, token in forged.items():
        r = server.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, name
        server.cookies.set("semilla_session", token)
        assert server.get("/auth/me").status_code == 401, name + " (cookie)"
        server.cookies.clear()
        assert_error(complete(server, {"Authorization": f"Bearer {token}"}), 401)  # the model routes too
    assert server.get("/auth/me", headers={"Authorization": f"Bearer {good}"}).json()["username"] == "bob"


def test_login_brute_force_is_throttled(tmp_path, tiny_run):
    with serve(build_app(make_settings(tmp_path, auth_attempts_per_minute=5), tiny_run)) as url:
        c = httpx.Client(base_url=url)
        register(c, "ana")
        codes = [c.post("/auth/login", data={"username": "ana", "password": f"guess{i}xx"}).status_code
                 for i in range(8)]  # fmt: skip
        assert codes[:4] == [401] * 4 and codes[-1] == 429
        r = c.post("/auth/login", data={"username": "ana", "password": "correct horse battery"})
        assert_error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["Retry-After"]) >= 1


def test_register_rejects_taken_names_and_weak_input(server):
    register(server, "ana")
    assert_error(
        server.post("/auth/register", json={"username": "ANA", "password": "another fine passphrase"}),
        409,
        "username_taken",
    )
    assert_error(server.post("/auth/register", json={"username": "a", "password": "x" * 10}), 400)
    assert_error(server.post("/auth/register", json={"username": "bob", "password": "short"}), 400)
    assert_error(
        server.post("/auth/register", json={"username": "bob'; DROP TABLE users;--", "password": "x" * 10}),
        400,
    )
    assert_error(server.post("/auth/login", data={"username": "ghost", "password": "x" * 10}), 401)


def test_request_rate_limit_answers_429_with_retry_after(tmp_path, tiny_run):
    rpm = {"anonymous": 3, "user": 3, "admin": 3}
    with serve(build_app(make_settings(tmp_path, rate_limit_rpm=rpm), tiny_run)) as url:
        c = httpx.Client(base_url=url)
        codes = [complete(c).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert int(complete(c).headers["Retry-After"]) >= 1


def test_token_rate_limit(tmp_path, tiny_run):
    with serve(build_app(make_settings(tmp_path, rate_limit_tpm={"anonymous": 10}), tiny_run)) as url:
        c = httpx.Client(base_url=url)
        r = complete(c, max_tokens=20, min_tokens=20)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
        r = complete(c)  # 20 real tokens overdrew a 10/minute budget: refused until it refills
        assert_error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["Retry-After"]) >= 60


def test_startup_policy(tmp_path):
    check_startup_policy(make_settings(tmp_path, host="127.0.0.1"))  # open on loopback: allowed
    with pytest.raises(StartupPolicyError, match="--insecure-no-auth"):
        check_startup_policy(make_settings(tmp_path, host="0.0.0.0"))
    check_startup_policy(make_settings(tmp_path, host="0.0.0.0", insecure_no_auth=True))
    with pytest.raises(StartupPolicyError, match="at least 32"):
        check_startup_policy(make_settings(tmp_path, jwt_secret="short"))
    settings = make_settings(tmp_path, host="0.0.0.0")
    from semilla.serve.accounts import open_store, users

    users.create_user(open_store(settings), "ana", "correct horse battery", role="admin")
    check_startup_policy(settings)  # accounts exist: authentication is on


def test_generated_secret_is_kept(tmp_path):
    from semilla.serve.accounts.security import load_jwt_secret

    first = load_jwt_secret("", str(tmp_path))
    assert len(first) >= 32 and load_jwt_secret("", str(tmp_path)) == first
    assert (tmp_path / "jwt_secret").stat().st_mode & 0o777 == 0o600
