"""Several `semilla serve` replicas on one PostgreSQL and one Redis (real servers on loopback):
accounts, key revocation, rate limits and the response cache are shared; migrations run once;
a replica with another JWT secret refuses to start; Redis or PostgreSQL going away costs no 500
and no acknowledged write."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
from accounts_helpers import build_app, login, make_settings, register, serve
from helpers import assert_one_line_error, clean_env, run_cli
from replica_helpers import Postgres, replica, running_postgres, running_redis
from server_helpers import free_port
from sqlalchemy import create_engine, text

from semilla.serve.accounts import StartupPolicyError, agree_on_secret, open_store
from semilla.serve.accounts.migrate import migrate
from semilla.serve.accounts.shared import RedisLink, SharedRateLimiter
from semilla.serve.settings import ServerSettings

SECRET = "s" * 48
LIMITS = '{"anonymous": 10, "user": 10, "admin": 100000}'  # requests per minute


@pytest.fixture(scope="module")
def postgres() -> Postgres:
    with running_postgres() as pg:
        yield pg


@pytest.fixture
def redis_server():
    with running_redis() as (url, proc):
        yield url, proc


def test_migrations_run_once_when_replicas_start_together(postgres: Postgres) -> None:
    """Four replicas migrating a new database at the same moment: all succeed, one schema."""
    url = postgres.new_database("together")
    engines = [create_engine(url) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(engines))

    def start(engine) -> None:
        barrier.wait()
        try:
            migrate(engine)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with engines[0].connect() as c:
        assert c.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
        assert c.execute(text("SELECT value FROM auth_generation WHERE id = 1")).scalar_one() == 0
    for engine in engines:
        engine.dispose()


def test_a_replica_with_another_jwt_secret_refuses_to_start(
    postgres: Postgres, tmp_path: Path, tiny_run: Path
) -> None:
    url = postgres.new_database("secrets")
    first = ServerSettings(_env_file=None, database_url=url, jwt_secret=SECRET, data_dir=str(tmp_path / "a"))
    store = open_store(first)
    agree_on_secret(store, SECRET.encode())
    agree_on_secret(store, SECRET.encode())  # the same secret: welcome
    secret_file = tmp_path / "secret"
    secret_file.write_text("t" * 48 + "\n")
    with pytest.raises(StartupPolicyError, match="SEMILLA_JWT_SECRET .*differs"):
        agree_on_secret(store, b"t" * 48)
    store.dispose()
    from semilla.serve.accounts import check_startup_policy

    other = ServerSettings(
        _env_file=None, database_url=url, jwt_secret_file=str(secret_file), data_dir=str(tmp_path / "b")
    )
    with pytest.raises(StartupPolicyError, match="SEMILLA_JWT_SECRET"):
        check_startup_policy(other)
    secret_file.write_text(SECRET)
    check_startup_policy(other)  # the shared secret from a file: the same fingerprint
    env = clean_env(SEMILLA_DATABASE_URL=url, SEMILLA_JWT_SECRET="t" * 48, PORT=str(free_port()))
    proc = run_cli("serve", f"tiny={tiny_run}", "--data-dir", tmp_path / "c", env=env)
    assert_one_line_error(proc, "SEMILLA_JWT_SECRET", "differs")


def test_retention_runs_on_one_replica_at_a_time(postgres: Postgres, tmp_path: Path) -> None:
    """While one replica holds the retention lock another deletes nothing; then it runs."""
    from semilla.serve.accounts.audit import RETENTION_LOCK, apply_retention
    from semilla.serve.accounts.db import AuditEntry, utcnow

    url = postgres.new_database("retention")
    store = open_store(ServerSettings(_env_file=None, database_url=url, data_dir=str(tmp_path)))
    with store.write() as s:
        s.add(AuditEntry(action="login", actor="cli", at=utcnow() - timedelta(days=40)))
    other = create_engine(url)
    with other.connect() as busy:  # another replica in the middle of its retention run
        busy.exec_driver_sql(f"SELECT pg_advisory_lock({RETENTION_LOCK})")
        assert apply_retention(store, 30)["audit"] == 0
        busy.exec_driver_sql(f"SELECT pg_advisory_unlock({RETENTION_LOCK})")
    assert apply_retention(store, 30)["audit"] == 1
    other.dispose()
    store.dispose()


def test_redis_down_mid_traffic_falls_back_to_per_process_limits(redis_server, caplog) -> None:
    url, proc = redis_server
    limiter = SharedRateLimiter(RedisLink(url))
    assert [limiter.take("user:1", 3) for _ in range(4)] == [0.0, 0.0, 0.0, 20.0]
    assert redis.Redis.from_url(url).exists("semilla:bucket:user:1")
    proc.kill()
    proc.wait()
    with caplog.at_level("ERROR", logger="semilla.accounts"):
        waits = [limiter.take("user:1", 3) for _ in range(4)]  # this process's own bucket now
    assert waits == [0.0, 0.0, 0.0, 20.0]
    outage = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage) == 1 and "per process" in outage[0].getMessage()  # loud, once


def test_postgres_restarted_under_load_answers_503_then_recovers(tmp_path: Path, tiny_run: Path) -> None:
    """While PostgreSQL is down: 503 with Retry-After (never a 500); once it is back, the same
    server answers again, and the write acknowledged before the restart is there."""
    with running_postgres() as pg:
        app = build_app(make_settings(tmp_path, database_url=pg.url), tiny_run)
        with serve(app) as base:
            c = httpx.Client(base_url=base, timeout=30)
            register(c, "root")
            h = login(c, "root")
            assert c.post("/feedback", headers=h, json={"rating": 1, "text": "before"}).status_code == 201
            pg.stop()
            down = [c.get("/auth/me", headers=h), c.post("/feedback", headers=h, json={"rating": 1})]
            assert [r.status_code for r in down] == [503, 503], [r.text for r in down]
            assert all(r.headers["retry-after"] == "5" for r in down)
            assert down[0].json()["error"]["code"] == "database_unavailable"
            pg.start()
            assert c.get("/auth/me", headers=h).status_code == 200
            texts = [f["text"] for f in c.get("/feedback", headers=h).json()["data"]]
            assert texts == ["before"]


@pytest.mark.slow
def test_two_replicas_share_postgres_and_redis(postgres: Postgres, tmp_path: Path, tiny_run: Path) -> None:
    url = postgres.new_database("replicas")
    with running_redis() as (redis_url, _):
        env = dict(
            SEMILLA_DATABASE_URL=url, SEMILLA_REDIS_URL=redis_url, SEMILLA_JWT_SECRET=SECRET,
            SEMILLA_RATE_LIMIT_RPM=LIMITS, HOST="127.0.0.1",
        )  # fmt: skip
        with (
            replica(tiny_run, tmp_path / "a", **env) as (_, a),
            replica(tiny_run, tmp_path / "b", **env) as (proc_b, b),
        ):
            ca, cb = httpx.Client(base_url=a, timeout=30), httpx.Client(base_url=b, timeout=30)
            # an account made on one logs in on the other
            register(ca, "root")
            admin = login(cb, "root")
            assert cb.get("/auth/me", headers=admin).json()["username"] == "root"

            # a key revoked on one is refused by the other within 1 s
            key = ca.post("/v1/keys", headers=admin, json={"name": "k"}).json()
            with_key = {"Authorization": f"Bearer {key['key']}"}
            assert cb.get("/v1/models", headers=with_key).status_code == 200
            assert ca.delete(f"/v1/keys/{key['id']}", headers=admin).status_code == 204
            revoked = time.monotonic()
            while cb.get("/v1/models", headers=with_key).status_code != 401:
                assert time.monotonic() - revoked < 1.0, "replica b still accepts the revoked key"
            assert time.monotonic() - revoked < 1.0

            # 10 requests a minute across both replicas: 100 at once, exactly 10 get through
            register(ca, "limited")
            user = login(cb, "limited")
            codes = asyncio.run(burst([a, b], user, 100))
            assert codes.count(200) == 10 and codes.count(429) == 90, sorted(set(codes))

            # a response cached by one is a hit on the other
            body = {"model": "tiny", "messages": [{"role": "user", "content": "Hola"}], "max_tokens": 4,
                    "temperature": 0}  # fmt: skip
            first = ca.post("/v1/chat/completions", headers=admin, json=body).json()
            again = cb.post("/v1/chat/completions", headers=admin, json=body).json()
            assert again["choices"][0]["message"] == first["choices"][0]["message"]
            assert cb.get("/admin/cache", headers=admin).json()["hits"] == 1
            assert "semilla_cache_hits_total 1.0" in cb.get("/metrics", headers=admin).text

            # kill -9 of one replica during a burst of feedback writes: no acknowledged write lost
            acknowledged = feedback_burst_until_killed([a, b], admin, proc_b)
            assert len(acknowledged) > 10
            engine = create_engine(url)
            with engine.connect() as c:
                stored = set(c.execute(text("SELECT text FROM feedback")).scalars())
            engine.dispose()
            assert set(acknowledged) <= stored


async def burst(bases: list[str], headers: dict, n: int) -> list[int]:
    """`n` GET /v1/models at once, spread over `bases`; their status codes."""
    async with httpx.AsyncClient(timeout=60) as client:
        calls = [client.get(bases[i % len(bases)] + "/v1/models", headers=headers) for i in range(n)]
        return [r.status_code for r in await asyncio.gather(*calls)]


def feedback_burst_until_killed(bases: list[str], headers: dict, victim) -> list[str]:
    """Feedback writes from 4 threads on every replica; kill -9 `victim` once 20 are acknowledged.
    The texts whose write was acknowledged (201)."""
    acknowledged: list[str] = []
    stop = threading.Event()

    def write(n: int) -> None:
        i = 0
        while not stop.is_set():
            text_ = f"w{n}-{i}"
            try:
                r = httpx.post(bases[n % len(bases)] + "/feedback", headers=headers,
                               json={"rating": 1, "text": text_}, timeout=10)  # fmt: skip
            except httpx.HTTPError:
                if n % len(bases) == 1:  # the killed replica's writers stop; the others go on
                    return
                continue
            if r.status_code == 201:
                acknowledged.append(text_)
            i += 1

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    time.sleep(0.5)  # the surviving replica keeps writing after the kill
    stop.set()
    for t in threads:
        t.join()
    return acknowledged
