"""Passwords (Argon2id), session tokens (JWT HS256) and API keys (shown once, stored as SHA-256)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# OWASP's Argon2id recommendation: m=19 MiB, t=2, p=1
PASSWORDS = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
KEY_PREFIX = "sk-"


class InsecureSecretError(ValueError):
    pass


def hash_password(password: str) -> str:
    return PASSWORDS.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return PASSWORDS.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# A hash to verify against when the user does not exist, so both cases take the same time
DUMMY_HASH = hash_password("not a real password")


def load_jwt_secret(configured: str, data_dir: str, secret_file: str = "") -> bytes:
    """The configured secret (>= 32 bytes, else refused), else the one in `secret_file`, else
    one generated once in data_dir."""
    if configured or secret_file:
        name = "SEMILLA_JWT_SECRET" if configured else f"SEMILLA_JWT_SECRET_FILE ({secret_file})"
        try:
            secret = configured.encode() if configured else Path(secret_file).read_bytes().strip()
        except OSError as e:
            raise InsecureSecretError(f"cannot read {name}: {e.strerror or e}") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise InsecureSecretError(
                f"{name} is {len(secret)} bytes; it must be at least {MIN_SECRET_BYTES} "
                '(generate one: python -c "import secrets; print(secrets.token_urlsafe(48))")'
            )
        return secret
    path = Path(data_dir) / "jwt_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".jwt_secret.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from the first byte
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
            f.flush()
            os.fsync(f.fileno())  # a crash never leaves an empty secret behind
        tmp.replace(path)
    secret = path.read_text().strip().encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise InsecureSecretError(f"{path} holds a secret shorter than {MIN_SECRET_BYTES} bytes")
    return secret


def secret_fingerprint(secret: bytes) -> str:
    """What servers sharing a database compare to know they sign with one secret (an HMAC:
    it says nothing about the secret itself)."""
    return hmac.new(secret, b"semilla jwt secret fingerprint", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    jti: str
    expires_at: float


def issue_token(secret: bytes, user_id: int, expire_minutes: int) -> tuple[str, TokenClaims]:
    now = int(time.time())
    claims = TokenClaims(user_id, secrets.token_hex(16), now + expire_minutes * 60)
    payload = {"sub": str(user_id), "iat": now, "nbf": now, "exp": int(claims.expires_at), "jti": claims.jti}
    return jwt.encode(payload, secret, algorithm=ALGORITHM), claims


def decode_token(secret: bytes, token: str) -> TokenClaims | None:
    """The claims of a valid token; None for any forged, tampered, expired or not-yet-valid one."""
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],  # never 'none', never what the token's header asks for
            options={"require": ["exp", "iat", "sub", "jti"]},
        )
        return TokenClaims(int(payload["sub"]), str(payload["jti"]), float(payload["exp"]))
    except (jwt.PyJWTError, ValueError, TypeError):
        return None


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Keys are 256 random bits: a plain SHA-256 is enough (no salt or slow hash needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)
