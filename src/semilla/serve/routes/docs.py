"""/docs: the OpenAPI page. Swagger UI's script and style come from jsDelivr (FastAPI's page),
so the page is off in production unless asked for (`SEMILLA_DOCS=true`), and it is served
with a Content-Security-Policy that admits only that CDN's files and the page's own inline
script (by its hash): nothing else can run, post or frame it."""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from semilla.serve.settings import ServerSettings

CDN = "https://cdn.jsdelivr.net"


def docs_enabled(settings: ServerSettings) -> bool:
    return settings.docs if settings.docs is not None else settings.environment != "production"


def csp_for(html: str) -> str:
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", html, re.S)
    )
    return (
        f"default-src 'none'; script-src {CDN} {hashes}; style-src {CDN} 'unsafe-inline'; "
        "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )


def install(app: FastAPI) -> None:
    """Serve /docs for `app` (whose openapi_url must be set)."""
    html = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API").body.decode()
    headers = {"Content-Security-Policy": csp_for(html), "X-Content-Type-Options": "nosniff"}

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)
