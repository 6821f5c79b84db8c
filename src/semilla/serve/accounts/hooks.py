"""AccountHooks: the accounts layer behind the model routes' hooks (see semilla.serve.hooks).

Who is calling (JWT bearer or cookie, API key as bearer or X-API-Key), whether they may
(open mode, scopes, roles), how fast (token buckets), the response cache, the content
filter, and the request log.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import UTC
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from semilla.serve.accounts import security, users
from semilla.serve.accounts.cache import ResponseCache, cache_key
from semilla.serve.accounts.content_filter import ContentFilter
from semilla.serve.accounts.db import Store
from semilla.serve.accounts.generation import AuthGeneration
from semilla.serve.accounts.ratelimit import RateLimiter
from semilla.serve.accounts.records import CompletionWriter
from semilla.serve.accounts.shared import RedisLink, SharedRateLimiter, SharedResponseCache
from semilla.serve.coalesce import CoalescedRead
from semilla.serve.errors import APIError
from semilla.serve.hooks import ANONYMOUS, CompletionRecord, Principal, ServerHooks
from semilla.serve.settings import ServerSettings

log = logging.getLogger("semilla.accounts")

COOKIE = "semilla_session"
PRINCIPAL_TTL_S = 10.0  # how often a key's last_used_at is written; changes apply at once (generation)
OPEN_SCOPES = ("models", "feedback", "conversations", "training")  # what anonymous may do in open mode
ACCOUNT_SCOPE = "account"  # managing one's own keys and session: a logged-in user, never a key


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def refuse_cross_site_cookie_writes(request: Request, credential: str) -> None:
    """CSRF: a state-changing request authenticated only by the session cookie must come from
    this site's own pages. Browsers say where a request comes from: Sec-Fetch-Site, else the
    Origin, else the Referer, which must name this very host. Other clients send a token or
    key in a header and are not affected."""
    if request.method in SAFE_METHODS or credential != request.cookies.get(COOKIE):
        return
    site = request.headers.get("sec-fetch-site")
    source = request.headers.get("origin") or request.headers.get("referer")
    if site is not None:
        allowed = site in ("same-origin", "none")
    elif source is not None:
        allowed = same_host(source, request.headers.get("host", ""))
    else:
        allowed = True  # not a browser (every browser sends one of them on a cross-site write)
    if not allowed:
        raise APIError(
            403, "cross-site request refused: use this server's own pages or send a token", code="csrf"
        )


def same_host(url: str, host: str) -> bool:
    """Whether `url` (an Origin or Referer) points at `host` (the Host header); 'null' never does."""
    from urllib.parse import urlsplit

    source, own = urlsplit(url), urlsplit("//" + host)
    default = {"http": 80, "https": 443}.get(source.scheme)
    try:
        return bool(source.hostname) and (source.hostname, source.port or default) == (
            own.hostname,
            own.port or default,
        )
    except ValueError:  # a port that is not a number
        return False


class AccountHooks(ServerHooks):
    def __init__(self, settings: ServerSettings, store: Store, secret: bytes):
        self.settings, self.store, self.secret = settings, store, secret
        cache_limits = (settings.cache_max_entries, settings.cache_max_bytes, settings.cache_ttl_s)
        # shared by every replica through Redis (semilla.serve.accounts.shared); other state that
        # replicas must share (provider cooldowns) can go through the same link
        self.redis = RedisLink(settings.redis_url) if settings.redis_url else None
        if self.redis:
            self.limiter: RateLimiter = SharedRateLimiter(self.redis)
            self.cache: ResponseCache = SharedResponseCache(self.redis, *cache_limits)
        else:
            self.limiter, self.cache = RateLimiter(), ResponseCache(*cache_limits)
        self.writer = CompletionWriter(store, settings.scrub_pii)
        self.content_filter = ContentFilter.load(settings.content_filter_file)
        self.generation = AuthGeneration(store)
        self._principals: dict[str, tuple[float, Principal]] = {}  # credential -> (valid until, who)
        self._lock = threading.Lock()
        self._seen_generation: int | None = None
        self._accounts = False
        self.refresh()
        self._refresh_shared = CoalescedRead(self.refresh)  # a burst of requests shares one read

    # --- policy ---------------------------------------------------------------------------

    def refresh(self) -> int:
        """Catch up with the store: when the auth generation moved (a user, key or revoked token
        changed, here or anywhere else), forget every cached identity and look again at whether
        accounts exist. One indexed read, blocking: run in a thread, shared by the requests that
        arrive together (CoalescedRead). Returns the generation read."""
        current = self.generation.current()
        if current == self._seen_generation:
            return current
        accounts = users.has_accounts(self.store)
        with self._lock:
            if self._seen_generation is None or current > self._seen_generation:  # never backwards
                self._principals.clear()
                self._accounts = accounts
                self._seen_generation = current
        return current

    def accounts_exist(self) -> bool:
        """Whether any user or key existed at the last refresh."""
        return self._accounts

    def open_for(self, scope: str) -> bool:
        """Whether an anonymous caller may use `scope` routes right now."""
        if scope == "models" and self.settings.insecure_no_auth:
            return True
        return scope in OPEN_SCOPES and not self._accounts and is_loopback(self.settings.host)

    def serves_anonymous(self) -> bool:
        return self.open_for("models")

    # --- who is calling -------------------------------------------------------------------

    @staticmethod
    def credential(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and auth[7:].strip():
            return auth[7:].strip()
        return request.headers.get("x-api-key") or request.cookies.get(COOKIE) or None

    def _identify(self, credential: str) -> tuple[Principal, float] | None:
        """(who presents `credential`, unix time it stops being valid), or None."""
        if security.looks_like_api_key(credential):
            found = users.resolve_key(self.store, credential)
            if found is None:
                return None
            key, user = found
            users.touch_key(self.store, key.id)  # once per identity-cache period, not per request
            expires = key.expires_at.replace(tzinfo=UTC).timestamp() if key.expires_at else math.inf
            return Principal(kind="key", role=user.role, user_id=user.id, key_id=key.id,
                             name=f"{user.username}/{key.name}", scopes=tuple(key.scopes.split())), expires  # fmt: skip
        claims = security.decode_token(self.secret, credential)
        if claims is None or users.token_revoked(self.store, claims.jti):
            return None
        user = users.get_user(self.store, claims.user_id)
        if user is None or user.disabled:
            return None
        scopes = (*users.DEFAULT_SCOPES, ACCOUNT_SCOPE, *(("admin",) if user.role == "admin" else ()))
        principal = Principal(kind="user", role=user.role, user_id=user.id, name=user.username, scopes=scopes)
        return principal, claims.expires_at

    async def identify(self, request: Request) -> Principal:
        """The caller, ANONYMOUS when no credential is presented; 401 for a bad one."""
        generation = await self._refresh_shared()  # first: what changed elsewhere applies now
        credential = self.credential(request)
        if credential is None:
            return ANONYMOUS
        refuse_cross_site_cookie_writes(request, credential)
        cached = self._principals.get(credential)
        if cached is not None and cached[0] > time.time():
            return cached[1]
        found = await run_in_threadpool(self._identify, credential)
        if found is None:  # a wrong guess costs like a failed login: guessing keys is throttled
            self.limit_auth_attempts(request)
            raise unauthorized("invalid, expired or revoked token or API key")
        principal, expires = found
        with self._lock:
            if self._seen_generation != generation:  # a change landed meanwhile: this may be stale
                return principal
            if len(self._principals) > 10_000:
                self._principals.clear()
            self._principals[credential] = (min(time.time() + PRINCIPAL_TTL_S, expires), principal)
        return principal

    async def authorize(self, request: Request, scope: str = "models") -> Principal:
        try:
            principal = await self.identify(request)
        except APIError:
            # open mode: OpenAI clients insist on some api_key ("unused", "sk-no-key"); any will do
            if not self.open_for(scope):
                raise
            principal = ANONYMOUS
        if principal is ANONYMOUS:
            if not self.open_for(scope):
                raise unauthorized("authentication required: send 'Authorization: Bearer <token or API key>'")
        elif scope not in principal.scopes or (scope == "admin" and principal.role != "admin"):
            if scope == "admin" and principal.role != "admin":
                raise APIError(403, "this endpoint is for admins", code="forbidden")
            raise APIError(403, f"this credential lacks the {scope!r} scope", code="insufficient_scope")
        self.limit_requests(principal, request)
        return principal

    # --- limits ---------------------------------------------------------------------------

    def _limit_key(self, principal: Principal, request: Request | None = None) -> str:
        if principal.user_id is None and principal.key_id is None and request is not None:
            return "ip:" + client_ip(request)
        return principal.scope

    def limit_requests(self, principal: Principal, request: Request) -> None:
        key = self._limit_key(principal, request)
        rpm = self.settings.rate_limit_rpm.get(principal.role, self.settings.rate_limit_rpm.get("user", 100))
        tpm = self.settings.rate_limit_tpm.get(principal.role, self.settings.rate_limit_tpm.get("user", 0))
        wait = self.limiter.check("tokens:" + principal.scope, tpm) or self.limiter.take(
            "requests:" + key, rpm
        )
        if wait:
            raise APIError(429, f"rate limit reached; retry in {wait:.0f} s", code="rate_limit_exceeded",
                           headers={"Retry-After": str(int(wait))})  # fmt: skip

    def limit_auth_attempts(self, request: Request) -> None:
        """Login and register: their own per-IP bucket, so brute force is slowed to a crawl."""
        wait = self.limiter.take("auth:" + client_ip(request), self.settings.auth_attempts_per_minute)
        if wait:
            raise APIError(429, f"too many attempts; retry in {wait:.0f} s", code="rate_limit_exceeded",
                           headers={"Retry-After": str(int(wait))})  # fmt: skip

    def record_tokens(self, principal: Principal, tokens: int) -> None:
        tpm = self.settings.rate_limit_tpm.get(principal.role, self.settings.rate_limit_tpm.get("user", 0))
        self.limiter.spend("tokens:" + principal.scope, tpm, tokens)

    # --- content --------------------------------------------------------------------------

    def screen_prompt(self, principal: Principal, text: str) -> None:
        if self.content_filter.blocked(text):
            raise APIError(400, "the prompt was refused by the content filter", code="content_filter")

    @property
    def screens_output(self) -> bool:
        return bool(self.content_filter.patterns)

    def screen_output(self, text: str) -> bool:
        return self.content_filter.blocked(text)

    # --- cache and records ----------------------------------------------------------------

    def cache_get(self, principal: Principal, material: dict[str, Any]) -> Any | None:
        if not self.cache.enabled:
            return None
        return self.cache.get(cache_key(principal.scope, material))

    def cache_put(self, principal: Principal, material: dict[str, Any], result: Any, size: int) -> None:
        if self.cache.enabled:
            self.cache.put(cache_key(principal.scope, material), result, size)

    def record_completion(self, principal: Principal, record: CompletionRecord) -> None:
        """A turn of a stored conversation is written now (the caller waits for the disk); the
        rest of the request log goes through the background writer."""
        if record.conversation_id:
            self.writer.write(principal, record)
        else:
            self.writer.submit(principal, record)
