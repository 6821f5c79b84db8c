"""Every error the server sends, in the shape of the API its path belongs to; this module is the
one place that says how.

OpenAI (every route but these): {"error": {"message", "type", "param", "code"}}
Anthropic (/v1/messages):       {"type": "error", "error": {"type", "message"}}
Ollama (/api/...):              {"error": "..."}
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_overloaded",
    504: "timeout_error",
}


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors)
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def api_of(path: str) -> str:
    """Which API a request path speaks: 'anthropic', 'ollama' or 'openai'."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    return "openai"


class APIError(Exception):
    """An HTTP error with OpenAI's body. Raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "api_error")
        self.headers = headers or {}

    def body(self, api: str = "openai") -> dict:
        """The error body in the shape of `api` (see api_of)."""
        if api == "anthropic":
            kind = ANTHROPIC_TYPES.get(self.status, "api_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        if api == "ollama":
            return {"error": self.message}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, path: str = "") -> JSONResponse:
        """The HTTP response; `path` (the request's) picks the API whose shape the body has."""
        return JSONResponse(self.body(api_of(path)), status_code=self.status, headers=self.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's list of problems as one 400 naming the first offending parameter."""
    errors = exc.errors()
    # a value no member of a union accepts gives one error per member: the deepest one says most
    # (messages.0.content.list[ContentPart].0.text: a lone surrogate, rather than "not a string")
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={"loc": (), "msg": "invalid request"})
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not is_union_member(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code="invalid_value")


def is_union_member(part) -> bool:
    """Pydantic names the member of a union it tried in the location ('str', 'list[ContentPart]')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}", 405: "method not allowed"}.get(
            exc.status_code, str(exc.detail)
        )
        refused = APIError(exc.status_code, message, headers=getattr(exc, "headers", None))
        return refused.response(request.url.path)
