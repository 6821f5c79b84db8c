"""Accounts and API keys: create, authenticate, change role, revoke."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from semilla.serve.accounts import security
from semilla.serve.accounts.db import ApiKey, RevokedToken, Store, User, utcnow
from semilla.serve.accounts.passwords import password_problem
from semilla.serve.errors import APIError

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{3,64}$")
ROLES = ("admin", "user")
SCOPES = ("models", "feedback", "conversations", "training", "admin")
DEFAULT_SCOPES = ("models", "feedback", "conversations", "training")


def user_dict(u: User) -> dict:
    return {"id": u.id, "username": u.username, "role": u.role, "disabled": u.disabled,
            "created_at": u.created_at.isoformat() + "Z"}  # fmt: skip


def key_dict(k: ApiKey) -> dict:
    iso = lambda d: d.isoformat() + "Z" if d else None  # noqa: E731
    return {"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": k.scopes.split(),
            "created_at": iso(k.created_at), "expires_at": iso(k.expires_at),
            "last_used_at": iso(k.last_used_at), "revoked": k.revoked_at is not None}  # fmt: skip


def has_accounts(store: Store) -> bool:
    with store.read() as s:
        return bool(s.scalar(select(func.count()).select_from(User))) or bool(
            s.scalar(select(func.count()).select_from(ApiKey))
        )


def validate_credentials(username: str, password: str) -> None:
    problems = []  # (param, message)
    if not USERNAME.match(username):
        problems.append(("username", "username must be 3-64 letters, digits or . _ @ -"))
    problem = password_problem(password, username)
    if problem:
        problems.append(("password", problem))
    if problems:
        raise APIError(400, "; ".join(message for _, message in problems), param=problems[0][0])


def create_user(store: Store, username: str, password: str, role: str | None = None) -> User:
    """A new account; the first one ever is an admin unless `role` says otherwise. 409 if taken."""
    validate_credentials(username, password)
    if role is not None and role not in ROLES:
        raise APIError(400, f"role must be one of {', '.join(ROLES)}, got {role!r}", param="role")
    password_hash = security.hash_password(password)  # slow: outside the write transaction
    with store.write() as s:
        if s.scalar(select(User.id).where(func.lower(User.username) == username.lower())) is not None:
            raise APIError(
                409, f"the username {username!r} is taken", param="username", code="username_taken"
            )
        first = s.scalar(select(func.count()).select_from(User)) == 0
        user = User(
            username=username, password_hash=password_hash, role=role or ("admin" if first else "user")
        )
        s.add(user)
    return user


def authenticate(store: Store, username: str, password: str) -> User | None:
    with store.read() as s:
        user = s.scalar(select(User).where(func.lower(User.username) == username.lower()))
    if user is None:
        security.verify_password(security.DUMMY_HASH, password)  # same time as a wrong password
        return None
    if not security.verify_password(user.password_hash, password) or user.disabled:
        return None
    return user


def get_user(store: Store, user_id: int) -> User | None:
    with store.read() as s:
        return s.get(User, user_id)


def find_user(store: Store, name_or_id: str) -> User:
    with store.read() as s:
        if name_or_id.isdigit():
            user = s.get(User, int(name_or_id))
        else:
            user = s.scalar(select(User).where(func.lower(User.username) == name_or_id.lower()))
    if user is None:
        raise APIError(404, f"no user {name_or_id!r}", param="user")
    return user


def list_users(store: Store) -> list[dict]:
    with store.read() as s:
        return [user_dict(u) for u in s.scalars(select(User).order_by(User.id))]


def update_user(store: Store, user_id: int, role: str | None = None, disabled: bool | None = None) -> User:
    if role is not None and role not in ROLES:
        raise APIError(400, f"role must be one of {', '.join(ROLES)}, got {role!r}", param="role")
    with store.write() as s:
        user = s.get(User, user_id)
        if user is None:
            raise APIError(404, f"no user {user_id}", param="user_id")
        if role is not None:
            user.role = role
        if disabled is not None:
            user.disabled = disabled
    return user


def revoke_token(store: Store, claims: security.TokenClaims) -> None:
    with store.write() as s:
        s.merge(
            RevokedToken(
                jti=claims.jti, expires_at=datetime.fromtimestamp(claims.expires_at, UTC).replace(tzinfo=None)
            )
        )


def token_revoked(store: Store, jti: str) -> bool:
    with store.read() as s:
        return s.get(RevokedToken, jti) is not None


def create_key(
    store: Store, user_id: int, name: str, scopes: list[str] | None = None, expires_in_days: int | None = None
) -> tuple[str, ApiKey]:
    """A new key for `user_id`: returns the key itself (shown once) and its stored row."""
    scopes = list(dict.fromkeys(scopes or DEFAULT_SCOPES))
    unknown = [sc for sc in scopes if sc not in SCOPES]
    if unknown:
        raise APIError(400, f"unknown scopes {unknown}; known: {', '.join(SCOPES)}", param="scopes")
    secret = security.new_api_key()
    expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    row = ApiKey(user_id=user_id, name=name, prefix=secret[:11], key_hash=security.hash_api_key(secret),
                 scopes=" ".join(scopes), expires_at=expires)  # fmt: skip
    with store.write() as s:
        s.add(row)
    return secret, row


def list_keys(store: Store, user_id: int | None) -> list[dict]:
    """One user's keys (`None`: everyone's, for admins)."""
    q = select(ApiKey).order_by(ApiKey.id)
    if user_id is not None:
        q = q.where(ApiKey.user_id == user_id)
    with store.read() as s:
        return [key_dict(k) | {"user_id": k.user_id} for k in s.scalars(q)]


def revoke_key(store: Store, key_id: int, user_id: int | None) -> ApiKey:
    """Revoke a key of `user_id` (None: any key, for admins); 404 for someone else's."""
    with store.write() as s:
        key = s.get(ApiKey, key_id)
        if key is None or (user_id is not None and key.user_id != user_id) or key.revoked_at:
            raise APIError(404, f"no key {key_id}", param="key_id")
        key.revoked_at = utcnow()
    return key


def resolve_key(store: Store, secret: str) -> tuple[ApiKey, User] | None:
    """The live key and its owner for a presented secret, or None (unknown, revoked, expired)."""
    with store.read() as s:
        key = s.scalar(select(ApiKey).where(ApiKey.key_hash == security.hash_api_key(secret)))
        if key is None or key.revoked_at or (key.expires_at and key.expires_at <= utcnow()):
            return None
        user = s.get(User, key.user_id)
    if user is None or user.disabled:
        return None
    return key, user


def touch_key(store: Store, key_id: int) -> None:
    with store.write() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))
