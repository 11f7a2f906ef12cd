"""Who may call the server: bearer tokens, the admin token, and who owns an async result.

Three kinds of caller: an API client (``token``, ``extra_tokens``, or any non-empty
bearer token on a ``public`` server), the admin (``admin_token``, the only token the
``/_local`` control routes answer, and one that may read every async result), and
everyone else (401, or 403 for a ``forbidden_tokens`` token). An async job records its
submitter as an *owner*: a keyed hash of the token (HMAC-SHA256 with a key of the
server's), so that the token itself is never kept, and a poll or fetch with another
token finds nothing, exactly as for an unknown id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

from .config import ServerConfig

__all__ = ["SECURITY_HEADERS", "Caller", "Gatekeeper", "new_owner_key"]

#: Sent with every answer: nothing is sniffed, framed, cached or leaks a referrer. API
#: answers hold users' images and ids, which no shared cache should keep.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
NO_STORE = (b"cache-control", b"no-store")


def new_owner_key() -> bytes:
    """A fresh key for owner hashes (one per server; a Ray Serve app shares one)."""
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: ``owner`` is what its async jobs record."""

    owner: str
    admin: bool = False


def _denied(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"message": message}, status_code=status, headers=headers)


class Gatekeeper:
    """Checks bearer tokens against a :class:`ServerConfig` (rebuilt when it changes)."""

    def __init__(self, config: ServerConfig, owner_key: bytes) -> None:
        self._key = owner_key
        self._api = [t.get_secret_value().encode() for t in config.api_tokens()]
        self._forbidden = [t.get_secret_value().encode() for t in config.forbidden_tokens]
        admin = config.admin_token_value()
        self._admin = None if admin is None else admin.encode()
        self._public = config.public

    def owner_of(self, token: bytes) -> str:
        """The owner an async job records for ``token`` (not reversible without the key)."""
        return hmac.new(self._key, token, hashlib.sha256).hexdigest()

    def _bearer(self, request: Request) -> bytes | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        return token.encode("latin-1", errors="replace")

    @staticmethod
    def _matches(token: bytes, candidates: list[bytes]) -> bool:
        # Every candidate is compared, so the time taken does not say which one matched.
        found = False
        for candidate in candidates:
            found |= hmac.compare_digest(token, candidate)
        return found

    def _is_admin(self, token: bytes) -> bool:
        return self._admin is not None and hmac.compare_digest(token, self._admin)

    def api_caller(self, request: Request) -> Caller | JSONResponse:
        """The API client calling, or the 401/403 answer (the admin token is not an API token)."""
        token = self._bearer(request)
        if token is None:
            return _denied(401, "Missing bearer token: send 'Authorization: Bearer <token>'.")
        if self._matches(token, self._forbidden):
            return _denied(403, "This token is not allowed to use this endpoint.")
        if self._matches(token, self._api) or (self._public and not self._is_admin(token)):
            return Caller(self.owner_of(token))
        return _denied(401, "Invalid bearer token.")

    def reader(self, request: Request) -> Caller | JSONResponse:
        """An API client or the admin: who may poll and fetch async results."""
        token = self._bearer(request)
        if token is not None and self._is_admin(token):
            return Caller(self.owner_of(token), admin=True)
        return self.api_caller(request)

    def admin(self, request: Request) -> Caller | JSONResponse:
        """The admin, or 401 (an API token is refused like any other wrong token)."""
        token = self._bearer(request)
        if token is None:
            return _denied(401, "Missing bearer token: the control routes need the admin token.")
        if not self._is_admin(token):
            return _denied(401, "Invalid admin token.")
        return Caller(self.owner_of(token), admin=True)
