"""Credentials: admin password, UI sessions, API keys (hashed at rest), worker credentials.

API keys look like GPUStack's, `gpustack_<access key>_<secret>` (keys of earlier specserve
versions, `sk-<access key>-<secret>`, still work); only the access key (for lookup) and a
SHA-256 of the secret are stored. Secrets are 256-bit random, so a plain hash suffices;
the admin password, chosen by a person, is stretched with PBKDF2.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import time

import sqlalchemy as sa
from fastapi import Request
from sqlalchemy.orm import sessionmaker

from specserve.cluster.db import ApiKey, User, utcnow

SESSION_COOKIE = "specserve_session"
KEY_PREFIX = "gpustack"
_PBKDF2_ROUNDS = 120_000


class ApiError(Exception):
    """Becomes an HTTP error with an OpenAI-style body `{"error": {...}}`."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def hash_password(password: str) -> str:
    salt = secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), _PBKDF2_ROUNDS)
    return f"pbkdf2_sha256${_PBKDF2_ROUNDS}${salt}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    _, rounds, salt, hexdigest = stored.split("$")
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), int(rounds))
    return hmac.compare_digest(digest.hex(), hexdigest)


def new_api_key() -> tuple[str, str, str]:
    """(full key shown once, access key, secret hash)."""
    access, secret = secrets.token_hex(8), secrets.token_hex(32)
    return f"{KEY_PREFIX}_{access}_{secret}", access, hash_secret(secret)


def split_api_key(key: str) -> tuple[str, str] | None:
    """(access key, secret) of a `gpustack_A_S` or legacy `sk-A-S` key, else None."""
    for prefix, sep in ((KEY_PREFIX, "_"), ("sk", "-")):
        parts = key.split(sep, 2)
        if len(parts) == 3 and parts[0] == prefix:
            return parts[1], parts[2]
    return None


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


class Authenticator:
    """Answers "may this request manage the cluster / call models?"."""

    def __init__(self, sessions: sessionmaker, session_ttl_s: float = 86400.0) -> None:
        self.sessions = sessions
        self.session_ttl_s = session_ttl_s
        self._ui_sessions: dict[str, float] = {}
        self._basic_ok: set[str] = set()  # hashes of verified basic credentials (PBKDF2 is slow)

    def login(self, username: str, password: str) -> str | None:
        if not self._check_user(username, password):
            return None
        token = secrets.token_urlsafe(32)
        self._ui_sessions[token] = time.monotonic() + self.session_ttl_s
        return token

    def logout(self, token: str | None) -> None:
        self._ui_sessions.pop(token or "", None)

    def require(self, request: Request, scope: str) -> None:
        """Raise a 401 ApiError unless the request carries a credential with `scope`."""
        if self._session_ok(request.cookies.get(SESSION_COOKIE)):
            return
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            if self._basic(header[6:].strip()):
                return
            raise ApiError(401, "wrong username or password", "invalid_credentials")
        key = bearer(request)
        if key is None:
            raise ApiError(
                401,
                "missing credentials: send 'Authorization: Bearer <api key>' "
                "(or the admin password as HTTP basic auth)",
                "invalid_api_key",
            )
        if not self.check_api_key(key, scope):
            raise ApiError(
                401,
                f"invalid or expired API key, or it lacks the {scope!r} scope",
                "invalid_api_key",
            )

    def check_api_key(self, key: str, scope: str) -> bool:
        parts = split_api_key(key)
        if parts is None:
            return False
        access, secret = parts
        with self.sessions.begin() as s:
            row = s.scalar(sa.select(ApiKey).where(ApiKey.access_key == access))
            if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
                return False
            if row.expires_at is not None and row.expires_at < utcnow():
                return False
            if not {scope, "*", "management"} & set(row.scopes):
                return False
            if row.last_used_at is None or utcnow() - row.last_used_at > dt.timedelta(seconds=60):
                row.last_used_at = utcnow()
        return True

    def _session_ok(self, token: str | None) -> bool:
        expiry = self._ui_sessions.get(token or "")
        return expiry is not None and expiry > time.monotonic()

    def _basic(self, encoded: str) -> bool:
        fingerprint = hash_secret(encoded)
        if fingerprint in self._basic_ok:
            return True
        try:
            username, _, password = base64.b64decode(encoded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if self._check_user(username, password):
            self._basic_ok.add(fingerprint)
            return True
        return False

    def _check_user(self, username: str, password: str) -> bool:
        with self.sessions() as s:
            user = s.scalar(sa.select(User).where(User.username == username))
        return user is not None and verify_password(password, user.password_hash)
