"""What an outside probe broke in the accounts layer, against a real server on loopback:
forwarded addresses, changes made outside the server, CSRF, weak passwords, file modes."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from accounts_helpers import build_app, chat, login, make_settings, register, serve

from semilla.cli import main
from semilla.serve.accounts import open_store
from semilla.serve.accounts.audit import audit_rows

WRONG = {"username": "ana", "password": "not the password"}
RIGHT = {"username": "ana", "password": "correct horse battery"}


def admin(tmp_path, *args: str) -> int:
    return main(["admin", "--data-dir", str(tmp_path / "data"), *args])


def test_forwarded_for_is_ignored_unless_the_proxy_is_named(tmp_path, tiny_run):
    settings = make_settings(tmp_path, auth_attempts_per_minute=5)
    with serve(build_app(settings, tiny_run)) as url, httpx.Client(base_url=url) as c:
        register(c, "ana")
        codes = [c.post("/auth/login", data=WRONG, headers={"X-Forwarded-For": f"10.0.{i}.1"}).status_code
                 for i in range(8)]  # fmt: skip
        assert codes[-1] == 429, codes  # one client, whatever it claims to be
        assert c.post("/auth/login", data=RIGHT, headers={"X-Forwarded-For": "10.99.0.1"}).status_code == 429
    ips = {row["ip"] for row in audit_rows(open_store(settings), action="login")}
    assert ips == {"127.0.0.1"}


def test_a_named_proxy_is_believed(tmp_path, tiny_run):
    settings = make_settings(tmp_path, auth_attempts_per_minute=2, forwarded_allow_ips="127.0.0.1")
    with serve(build_app(settings, tiny_run)) as url, httpx.Client(base_url=url) as c:
        register(c, "ana")
        codes = [c.post("/auth/login", data=WRONG, headers={"X-Forwarded-For": f"10.0.{i}.1"}).status_code
                 for i in range(4)]  # fmt: skip
        assert codes == [401] * 4  # four clients behind the proxy, one attempt each
    assert {row["ip"] for row in audit_rows(open_store(settings), action="login")} == {
        f"10.0.{i}.1" for i in range(4)
    }


@pytest.fixture
def world(tmp_path, tiny_run, monkeypatch):
    """A server, and the same store changed from outside it (the admin CLI, plain SQL)."""
    monkeypatch.setenv("SEMILLA_ADMIN_PASSWORD", "correct horse battery")
    with serve(build_app(make_settings(tmp_path), tiny_run)) as url, httpx.Client(base_url=url) as c:
        yield c


def test_changes_made_outside_the_server_apply_on_the_next_request(world, tmp_path):
    c = world
    assert chat(c).status_code == 200  # open mode
    assert admin(tmp_path, "create-user", "root", "--admin") == 0
    assert chat(c).status_code == 401  # open mode ended with the first account, made elsewhere
    assert admin(tmp_path, "create-user", "ana") == 0
    assert admin(tmp_path, "set-role", "ana", "admin") == 0
    ana = login(c, "ana")
    key = c.post("/v1/keys", headers=ana, json={"name": "app"}).json()["key"]
    for _ in range(3):  # identities are cached now
        assert c.get("/admin/users", headers=ana).status_code == 200
        assert chat(c, {"X-API-Key": key}).status_code == 200
    assert admin(tmp_path, "revoke-key", "1") == 0
    assert chat(c, {"X-API-Key": key}).status_code == 401
    assert admin(tmp_path, "set-role", "ana", "user") == 0
    assert c.get("/admin/users", headers=ana).status_code == 403
    key = c.post("/v1/keys", headers=ana, json={"name": "app2"}).json()["key"]
    assert chat(c, {"X-API-Key": key}).status_code == 200
    assert c.post("/v1/conversations", headers=ana, json={"title": "x"}).status_code == 201
    with sqlite3.connect(tmp_path / "data" / "semilla.db") as db:  # deleted by hand
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM users WHERE username = 'ana'")
    assert chat(c, ana).status_code == 401
    assert chat(c, {"X-API-Key": key}).status_code == 401
    assert c.post("/v1/conversations", headers=ana, json={"title": "x"}).status_code == 401


def test_open_mode_ends_at_once_when_accounts_are_registered_over_http(world):
    c = world
    assert chat(c).status_code == 200
    register(c, "ana")
    register(c, "bob")
    assert chat(c, login(c, "bob")).status_code == 200
    c.cookies.clear()  # the login's session cookie would make the next chat bob's
    assert chat(c).status_code == 401


def test_cookie_writes_from_another_origin_are_refused_without_sec_fetch_site(world):
    c = world
    register(c, "ana")
    c.post("/auth/login", data=RIGHT)  # the session cookie
    own = c.base_url.host + ":" + str(c.base_url.port)
    for header in ({"Origin": "https://evil.example"}, {"Referer": "https://evil.example/page"},
                   {"Origin": "null"}, {"Origin": f"http://{own.split(':')[0]}:1"}):  # fmt: skip
        assert c.post("/v1/conversations", json={"title": "x"}, headers=header).status_code == 403, header
        assert c.post("/v1/keys", json={"name": "stolen"}, headers=header).status_code == 403, header
    for header in ({"Origin": f"http://{own}"}, {"Referer": f"http://{own}/keys"}, {}):
        assert c.post("/v1/conversations", json={"title": "x"}, headers=header).status_code == 201, header


@pytest.mark.parametrize(
    "password",
    ["password", "12345678", "        ", "aaaaaaaaaa", "PassWord123", "qwertyuiop", "ana-the-user"],
)
def test_common_and_trivial_passwords_are_refused(world, tmp_path, monkeypatch, password):
    r = world.post("/auth/register", json={"username": "ana-the-user", "password": password})
    assert r.status_code == 400 and r.json()["error"]["param"] == "password", r.text
    monkeypatch.setenv("SEMILLA_ADMIN_PASSWORD", password)
    assert admin(tmp_path, "create-user", "ana-the-user") == 2  # the CLI applies the same rule


def test_the_database_and_its_wal_are_private(world, tmp_path):
    register(world, "ana")
    data = tmp_path / "data"
    files = [data / "semilla.db", data / "semilla.db-wal", data / "semilla.db-shm"]
    assert all(f.exists() for f in files)
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o600"}


def test_a_dangling_key_row_is_one_line_from_the_admin_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEMILLA_ADMIN_PASSWORD", "correct horse battery")
    assert admin(tmp_path, "create-user", "ana") == 0
    assert admin(tmp_path, "create-key", "ana") == 0
    with sqlite3.connect(tmp_path / "data" / "semilla.db") as db:  # foreign keys off: the key is orphaned
        db.execute("DELETE FROM users")
    capsys.readouterr()
    assert admin(tmp_path, "audit") == 2
    err = capsys.readouterr().err
    assert err.startswith("semilla: error:") and err.count("\n") == 1 and "api_keys" in err, err


def test_metrics_need_an_admin_once_accounts_exist_unless_public(tmp_path, tiny_run):
    with serve(build_app(make_settings(tmp_path), tiny_run)) as url, httpx.Client(base_url=url) as c:
        assert c.get("/metrics").status_code == 200  # open mode: everything is open
        register(c, "root")
        register(c, "ana")
        c.cookies.clear()
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=login(c, "ana")).status_code == 403
        assert c.get("/metrics", headers=login(c, "root")).status_code == 200
    public = make_settings(tmp_path / "public", metrics_public=True)
    with serve(build_app(public, tiny_run)) as url, httpx.Client(base_url=url) as c:
        register(c, "root")
        c.cookies.clear()
        assert c.get("/metrics").status_code == 200


def test_docs_are_off_in_production_and_locked_down_elsewhere(tmp_path, tiny_run):
    with serve(build_app(make_settings(tmp_path), tiny_run)) as url:
        r = httpx.get(url + "/docs")
        csp = r.headers["content-security-policy"]
        assert r.status_code == 200 and "script-src https://cdn.jsdelivr.net 'sha256-" in csp
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert httpx.get(url + "/redoc").status_code == 404
    with serve(build_app(make_settings(tmp_path, environment="production"), tiny_run)) as url:
        assert httpx.get(url + "/docs").status_code == 404
        assert httpx.get(url + "/openapi.json").status_code == 404
