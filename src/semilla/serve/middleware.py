"""ASGI middleware: unexpected errors as 500s that keep the connection, request framing and
Host checks, a request body size limit (413) and request metrics by route.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from starlette.exceptions import HTTPException

from semilla.serve import metrics
from semilla.serve.errors import APIError

log = logging.getLogger(__name__)


class UnexpectedErrors:
    """The outermost layer: an exception nothing else handled becomes OpenAI's 500 and goes
    no further. (Starlette's own handler re-raises after answering, and uvicorn then drops
    the connection, so a keep-alive client would lose its next request too.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            if started:  # part of a response is out: only closing the connection can end it
                raise
            await APIError(500, "internal server error", type="server_error").response(scope["path"])(
                scope, receive, send
            )


class RequestGuard:
    """Requests refused before any route sees them:

    - both Content-Length and Transfer-Encoding: a proxy in front may frame the body one way
      and this server the other (request smuggling), so 400 and the connection is closed;
    - a Host this server does not answer to (DNS rebinding: a web page whose name now points
      at 127.0.0.1 would reach an open server), 400, while `host_check()` says so."""

    def __init__(self, app, allowed: AllowedHosts, host_check):
        self.app, self.allowed, self.host_check = app, allowed, host_check

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        names = [name for name, _ in scope["headers"]]
        if b"transfer-encoding" in names and b"content-length" in names:
            refused = APIError(
                400,
                "a request may not have both Content-Length and Transfer-Encoding",
                code="ambiguous_framing",
                headers={"Connection": "close"},
            )
            return await refused.response(scope["path"])(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host and not self.allowed.allows(host) and self.host_check():
            refused = APIError(
                400,
                f"this server does not answer to the host {host!r}: add it with --allowed-hosts",
                code="host_not_allowed",
            )
            return await refused.response(scope["path"])(scope, receive, send)
        await self.app(scope, receive, send)


class AllowedHosts:
    """The names a Host header may carry: loopback names (localhost, *.localhost), any IP
    address (a rebinding page always sends its own DNS name), the bind host and the names
    configured; '*' allows every name."""

    def __init__(self, bind_host: str, configured: str = ""):
        names = {n.strip().lower().rstrip(".") for n in configured.split(",") if n.strip()}
        self.any = "*" in names
        self.names = names | {"localhost", bind_host.lower()}

    def allows(self, host: str) -> bool:
        name = host_name(host)
        if self.any or name in self.names or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, or while a chunked body
    streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(
            413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large"
        )
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big.response(scope["path"])(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTPExceptions through to the handlers."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class RequestMetrics:
    """Count requests by route template, method and status; time them to the last byte."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            metrics.REQUESTS.labels(label, scope["method"], str(status)).inc()
            metrics.REQUEST_LATENCY.labels(label).observe(time.perf_counter() - start)
