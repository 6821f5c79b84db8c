"""The web client's routes: three pages, the dashboard's stats, and the headers that guard them."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "chat.html", "/keys": "keys.html", "/admin": "admin.html"}

# Nothing inline, nothing remote: a reply that smuggled markup past the renderer still could not
# run a script, load an image from elsewhere, post anywhere but here, or be framed.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-cache"),  # revalidate (ETag) so an upgraded server's pages are seen at once
]

router = APIRouter(include_in_schema=False)


def page(name: str):
    async def serve_page() -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html; charset=utf-8")

    return serve_page


for path, name in PAGES.items():
    router.add_api_route(path, page(name), methods=["GET"], name=f"page:{name}")


@router.get("/admin/stats")
async def admin_stats(request: Request) -> dict:
    """The dashboard's time series (admins only): see semilla.serve.web.stats."""
    await request.app.state.hooks.authorize(request, "admin")
    return request.app.state.web_stats.series()


class SecurityHeaders:
    """Add CSP and friends to the web client's pages and assets (plain ASGI: streams untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path not in PAGES and not path.startswith("/static/"):
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {name for name, _ in HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)
