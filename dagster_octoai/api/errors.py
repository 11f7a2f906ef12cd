"""Every exception dagster-octoai raises, in one hierarchy.

Each error carries what a support ticket needs (HTTP status, the server's
``X-User-Request-ID``, the async ``response_id``) and never the API token: the
client redacts it from every message before an exception is built. The storage
errors live here too, so that the one hierarchy is in one file; the image stores in
:mod:`dagster_octoai.storage` raise them.

```
OctoAIError
├── RequestValidationError        bad input, refused before anything is sent
├── ResponseFormatError           the server's answer is not a valid OctoAI body
├── UntrustedOriginError          a poll or response URL on another origin; the token stays home
├── ImageError
│   ├── ImageDecodeError          an image's bytes cannot be decoded
│   └── ImageRemovedForSafetyError  reading the bytes of a blocked image
├── TransportError
│   ├── ConnectionFailedError     the connection failed or dropped
│   └── DeadlineExceededError     the overall deadline of a call ran out
├── APIStatusError                the server answered with an error status
│   ├── BadRequestError (400)
│   │   └── PolicyViolationError  the Acceptable Use Policy 400
│   ├── AuthenticationError (401)
│   ├── PermissionDeniedError (403)
│   ├── NotFoundError (404)
│   │   ├── JobExpiredError       an async result deleted after its time (404 on poll/fetch)
│   │   └── JobUnknownError       an async id the server never made, or another token's
│   ├── UnprocessableEntityError (422)
│   ├── RateLimitError (429)
│   └── ServerError (5xx)
├── JobFailedError                an async job ended in a failed status
│   └── JobCancelledError         an async job was cancelled (DELETE /v1/requests/{id})
├── JobNotReadyError              fetching an async job that is not completed yet
└── StorageError                  storing or loading images failed (bucket, credentials...)
    ├── ObjectNotFoundError       an image or manifest that should exist is not there
    └── ConflictError             a conditional write lost a race to another writer
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "APIStatusError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "ConnectionFailedError",
    "DeadlineExceededError",
    "ImageDecodeError",
    "ImageError",
    "ImageRemovedForSafetyError",
    "JobCancelledError",
    "JobExpiredError",
    "JobFailedError",
    "JobNotReadyError",
    "JobUnknownError",
    "NotFoundError",
    "ObjectNotFoundError",
    "OctoAIError",
    "PermissionDeniedError",
    "PolicyViolationError",
    "RateLimitError",
    "RequestValidationError",
    "ResponseFormatError",
    "ServerError",
    "StorageError",
    "TransportError",
    "UnprocessableEntityError",
    "UntrustedOriginError",
]


class OctoAIError(Exception):
    """Base class of every error raised by dagster-octoai's client."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        response_id: str | None = None,
    ) -> None:
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.response_id = response_id
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.append(f"status={self.status_code}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        if self.response_id:
            parts.append(f"response_id={self.response_id}")
        return " | ".join(parts)


# Input errors: raised before anything is sent.


class RequestValidationError(OctoAIError, ValueError):
    """A request broke a rule of the API; raised before anything is sent.

    ``errors`` lists each problem as ``{"field": ..., "message": ...}``.
    """

    def __init__(self, message: str, errors: Sequence[Mapping[str, str]] = ()) -> None:
        self.errors = [dict(e) for e in errors]
        super().__init__(message)


# Answer errors: the server answered, but not with something usable.


class ResponseFormatError(OctoAIError):
    """The server's answer is not a valid OctoAI body (bad JSON, HTML page, missing fields)."""


class UntrustedOriginError(OctoAIError):
    """A ``poll_url`` or ``response_url`` points at an origin other than ``base_url``'s.

    Raised before anything is sent there: the token goes only to the configured server
    and to the origins named in ``trusted_origins``. ``url`` is the refused URL's origin.
    """

    def __init__(self, message: str, *, origin: str, response_id: str | None = None) -> None:
        self.origin = origin
        super().__init__(message, response_id=response_id)


class ImageError(OctoAIError):
    """Base class of errors raised when reading a returned image."""


class ImageDecodeError(ImageError):
    """An image's base64 or bytes cannot be decoded (corrupt or truncated)."""


class ImageRemovedForSafetyError(ImageError):
    """The bytes of an image that the server removed for safety were asked for."""


# Transport errors: no usable HTTP answer.


class TransportError(OctoAIError):
    """Base class of errors where no usable HTTP answer arrived."""


class ConnectionFailedError(TransportError):
    """The connection could not be made, or dropped, on every attempt."""


class DeadlineExceededError(TransportError):
    """The overall deadline of a call (all attempts and waits) ran out."""


# Status errors: the server answered with an error status.


class APIStatusError(OctoAIError):
    """The server answered with an error status; ``body`` holds its parsed answer."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        request_id: str | None = None,
        response_id: str | None = None,
    ) -> None:
        self.body = body
        super().__init__(
            message, status_code=status_code, request_id=request_id, response_id=response_id
        )


class BadRequestError(APIStatusError):
    """The server refused the request (400)."""


class PolicyViolationError(BadRequestError):
    """The request violates the Acceptable Use Policy (400 with a policy message)."""


class AuthenticationError(APIStatusError):
    """The token is missing or invalid (401)."""


class PermissionDeniedError(APIStatusError):
    """The token may not use this engine or asset (403)."""


class NotFoundError(APIStatusError):
    """Unknown engine or URL (404)."""


class JobExpiredError(NotFoundError):
    """An async result is gone: results are kept 24 hours, then poll and fetch answer 404."""


class JobUnknownError(NotFoundError):
    """An async ``response_id`` the server does not know, or one submitted with another token (404)."""


class UnprocessableEntityError(APIStatusError):
    """The server's validation refused the body (422); ``detail`` is its list of problems."""

    @property
    def detail(self) -> list[dict[str, Any]]:
        if isinstance(self.body, dict) and isinstance(self.body.get("detail"), list):
            return [d for d in self.body["detail"] if isinstance(d, dict)]
        return []


class RateLimitError(APIStatusError):
    """Too many requests (429); ``retry_after`` is the server's wait in seconds, if given."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class ServerError(APIStatusError):
    """The server failed (5xx); retried by the client until its deadline."""


# Async job errors.


class JobFailedError(OctoAIError):
    """An async job ended with a ``failed`` status; resubmit it with the same parameters."""


class JobCancelledError(JobFailedError):
    """An async job was cancelled (``DELETE /v1/requests/{id}``) before it completed."""


class JobNotReadyError(OctoAIError):
    """An async job was fetched before it completed; ``wait(job)`` or poll again later.

    Nothing is lost: the job goes on running on the server. ``response_id`` names it.
    """


# Storage errors: the image stores (dagster_octoai.storage) and the IO managers.


class StorageError(OctoAIError):
    """Storing or loading images failed (missing bucket, refused credentials, missing object...)."""


class ObjectNotFoundError(StorageError):
    """An object (image, manifest) that should exist is not there."""


class ConflictError(StorageError):
    """A conditional write lost a race: another writer changed the object after it was read.

    Nothing was written. Read the object again and decide from what is there now.
    """
