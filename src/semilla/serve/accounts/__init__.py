"""Accounts and safety: users, API keys, rate limits, response cache, feedback, audit.

The server calls two functions:

    check_startup_policy(settings)   # before binding: refuses unsafe set-ups with a clear error
    install(app, settings)           # creates/migrates the store, sets app.state.hooks, routes
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the web framework and the database load when a server or command needs them,
    # not for every `semilla` command line (they cost ~0.5 s of its start)
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from semilla.serve.accounts.db import Store
    from semilla.serve.settings import ServerSettings

log = logging.getLogger("semilla.accounts")
RETENTION_EVERY_S = 24 * 3600
DATABASE_RETRY_AFTER_S = 5


class StartupPolicyError(ValueError):
    """The server must not start with these settings (the message says why and what to do)."""


def open_store(settings: ServerSettings) -> Store:
    """The store at settings.database_url (default: SQLite under data_dir), migrated to the newest schema."""
    from semilla.serve.accounts.db import Store, default_url
    from semilla.serve.accounts.migrate import migrate

    store = Store(settings.database_url or default_url(settings.data_dir))
    migrate(store.engine)
    return store


def check_startup_policy(settings: ServerSettings) -> None:
    """Raise StartupPolicyError when the server must not start; log loudly when it runs open.

    Open (no authentication on model routes) is allowed only on a loopback address while no
    user or key exists, or anywhere with `--insecure-no-auth`.
    """
    from semilla.serve.accounts import security, users
    from semilla.serve.accounts.hooks import is_loopback

    try:
        secret = security.load_jwt_secret(settings.jwt_secret, settings.data_dir, settings.jwt_secret_file)
    except security.InsecureSecretError as e:
        raise StartupPolicyError(str(e)) from None
    if settings.redis_url:
        check_redis(settings.redis_url)
    store = open_store(settings)
    try:
        agree_on_secret(store, secret)
        accounts = users.has_accounts(store)
    finally:
        store.dispose()
    if settings.insecure_no_auth:
        log.warning("!!! --insecure-no-auth: model routes need no token or key, on %s !!!", settings.host)
    elif not accounts and not is_loopback(settings.host):
        raise StartupPolicyError(
            f"refusing to serve on {settings.host} without authentication: create an account first "
            "(semilla admin create-user NAME --admin) or pass --insecure-no-auth"
        )
    elif not accounts:
        log.warning(
            "!!! OPEN MODE: no users or API keys exist, so anyone on this machine can use the models "
            "without a token. Register an account (the first becomes admin) to require authentication. !!!"
        )


def agree_on_secret(store: Store, secret: bytes) -> None:
    """Servers sharing a database must sign tokens with one secret, or a token issued by one is
    refused by the next: the first records the secret's fingerprint, a server with another
    secret refuses to start. A SQLite database is one server's own: a new secret (the old
    secret file deleted) replaces the fingerprint, as it already ends every session."""
    from sqlalchemy.exc import IntegrityError

    from semilla.serve.accounts.db import ServerFact
    from semilla.serve.accounts.security import secret_fingerprint

    fingerprint = secret_fingerprint(secret)
    with store.read() as s:
        recorded = s.get(ServerFact, "jwt_secret_fingerprint")
    if recorded is None:
        try:
            with store.write() as s:
                s.add(ServerFact(name="jwt_secret_fingerprint", value=fingerprint))
        except IntegrityError:  # another replica recorded its own meanwhile
            pass
        with store.read() as s:
            recorded = s.get(ServerFact, "jwt_secret_fingerprint")
    if recorded.value == fingerprint:
        return
    if store.engine.dialect.name == "sqlite":
        with store.write() as s:
            s.merge(ServerFact(name="jwt_secret_fingerprint", value=fingerprint))
        log.warning("the JWT secret changed: sessions signed with the old one are no longer valid")
        return
    raise StartupPolicyError(
        "SEMILLA_JWT_SECRET (or SEMILLA_JWT_SECRET_FILE) differs from the secret the other servers on "
        "this database sign tokens with: give every replica the same secret"
    )


def check_redis(url: str) -> None:
    """A Redis URL that does not answer at start-up is a mistake to report, not an outage."""
    try:
        from semilla.serve.accounts.shared import RedisLink

        RedisLink(url).check()
    except ImportError:
        raise StartupPolicyError(
            "SEMILLA_REDIS_URL needs the redis client: pip install 'semilla[replicas]'"
        ) from None
    except Exception as e:  # redis raises its own errors for a bad URL, refused or timed out connections
        raise StartupPolicyError(f"SEMILLA_REDIS_URL {url} does not answer: {e}") from None


def install(app: FastAPI, settings: ServerSettings) -> None:
    """Plug the accounts layer into `app`: store, hooks, routes, CORS and the retention job."""
    from fastapi.middleware.cors import CORSMiddleware
    from sqlalchemy.exc import InterfaceError, OperationalError

    from semilla.serve.accounts import security
    from semilla.serve.accounts.hooks import AccountHooks
    from semilla.serve.accounts.routes import admin, auth, conversations, feedback, keys, training

    store = open_store(settings)
    secret = security.load_jwt_secret(settings.jwt_secret, settings.data_dir, settings.jwt_secret_file)
    hooks = AccountHooks(settings, store, secret)
    app.state.hooks = app.state.accounts = hooks
    for module in (auth, keys, feedback, conversations, training, admin):
        app.include_router(module.router)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials="*" not in origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.add_exception_handler(OperationalError, database_unavailable)
    app.add_exception_handler(InterfaceError, database_unavailable)
    start_retention(store, settings.retention_days)


async def database_unavailable(request, exc) -> JSONResponse:
    """The database is down or restarting (PostgreSQL): 503 with Retry-After, never a 500; the
    engine's pre-ping reconnects on its own once it is back."""
    from semilla.serve.errors import APIError

    log.error("database unavailable on %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0])
    return APIError(
        503, "the database is unavailable; retry shortly", type="server_error", code="database_unavailable",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    ).response()  # fmt: skip


def start_retention(store: Store, days: int) -> None:
    """Delete old request logs and audit rows now and once a day (a daemon thread)."""
    from semilla.serve.accounts.audit import apply_retention

    if days <= 0:
        return
    stop = threading.Event()

    def run() -> None:
        while True:
            try:
                deleted = apply_retention(store, days)
                if any(deleted.values()):
                    log.info("retention (%d days): deleted %s", days, deleted)
            except Exception:
                log.exception("retention job failed")
            if stop.wait(RETENTION_EVERY_S):
                return

    threading.Thread(target=run, name="semilla-retention", daemon=True).start()
