"""POST /auth/register, POST /auth/login (OAuth2 password form), POST /auth/logout, GET /auth/me."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from semilla.serve.accounts import security, users
from semilla.serve.accounts.audit import audit
from semilla.serve.accounts.deps import Accounts, AccountUser
from semilla.serve.accounts.hooks import COOKIE, client_ip
from semilla.serve.errors import APIError
from semilla.serve.protocol import Body

router = APIRouter(prefix="/auth", tags=["auth"])


class Credentials(Body):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class UserOut(BaseModel):
    id: int
    username: str
    role: str
    disabled: bool
    created_at: str


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    user: UserOut


@router.post("/register", status_code=201, response_model=UserOut)
def register(body: Credentials, request: Request, accounts: Accounts) -> dict:
    """Create an account; the first one becomes admin."""
    accounts.limit_auth_attempts(request)
    accounts.refresh()
    if not accounts.settings.allow_registration and accounts.accounts_exist():
        raise APIError(403, "registration is closed: ask an admin for an account", code="registration_closed")
    user = users.create_user(accounts.store, body.username, body.password)
    audit(accounts.store, "user.register", f"user:{user.id}", target=user.username, ip=client_ip(request),
          detail={"role": user.role})  # fmt: skip
    return users.user_dict(user)


@router.post("/login", response_model=TokenOut)
def login(
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    request: Request,
    response: Response,
    accounts: Accounts,
) -> dict:
    """OAuth2 password flow: a bearer token, also set as an HttpOnly session cookie."""
    accounts.limit_auth_attempts(request)
    user = users.authenticate(accounts.store, username, password)
    ip = client_ip(request)
    if user is None:
        audit(accounts.store, "login", "anonymous", target=username, ip=ip, success=False)
        raise APIError(401, "wrong username or password", code="invalid_credentials",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    expire = accounts.settings.jwt_expire_minutes
    token, _ = security.issue_token(accounts.secret, user.id, expire)
    response.set_cookie(COOKIE, token, max_age=expire * 60, httponly=True, samesite="lax", path="/",
                        secure=accounts.settings.environment == "production")  # fmt: skip
    audit(accounts.store, "login", f"user:{user.id}", target=user.username, ip=ip)
    return {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": expire * 60,
        "user": users.user_dict(user),
    }


@router.post("/logout", status_code=204)
async def logout(principal: AccountUser, request: Request, accounts: Accounts) -> Response:
    """End this session: the token is revoked and the cookie cleared."""
    credential = accounts.credential(request)
    claims = security.decode_token(accounts.secret, credential or "")
    if claims is not None:
        await run_in_threadpool(users.revoke_token, accounts.store, claims)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/me", response_model=UserOut)
def me(principal: AccountUser, accounts: Accounts) -> dict:
    user = users.get_user(accounts.store, principal.user_id)
    if user is None:
        raise APIError(401, "this account no longer exists")
    return users.user_dict(user)
