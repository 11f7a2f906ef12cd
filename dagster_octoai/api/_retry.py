"""Retry policy and its arithmetic: which answers are retried and how long to wait.

Pure functions, no I/O, shared by the sync and the async client.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["HTTPRetryPolicy", "is_retryable_status", "parse_retry_after"]

# 501 Not Implemented and 505 HTTP Version Not Supported never heal by waiting.
_PERMANENT_5XX = frozenset({501, 505})


class HTTPRetryPolicy(BaseModel):
    """How a client retries one HTTP call.

    Retried: 408, 429, 5xx (but 501 and 505), failed or dropped connections and
    timeouts. Every other 4xx is raised at once. Waits use exponential backoff with
    full jitter (``uniform(0, min(max_backoff_s, initial_backoff_s * 2**n))``), or
    the server's ``Retry-After`` when it sends one. A ``Retry-After`` longer than
    ``max_retry_after_s`` ends the retries at once: retrying sooner than the server
    asked would only earn another 429, and the error's ``retry_after`` tells the
    caller how long to wait. ``deadline_s`` bounds the whole call, attempts and
    waits together; a wait that would overrun it is not started.

    Examples:
        >>> HTTPRetryPolicy(max_attempts=3, deadline_s=60).max_attempts
        3
        >>> HTTPRetryPolicy.none().max_attempts
        1
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(
        default=5, ge=1, description="Total attempts per HTTP call (1 = no retry)."
    )
    initial_backoff_s: float = Field(
        default=0.5,
        ge=0,
        description="Backoff base: the n-th retry waits up to initial * 2**n seconds.",
    )
    max_backoff_s: float = Field(
        default=20.0, ge=0, description="Cap on one backoff wait, seconds."
    )
    max_retry_after_s: float = Field(
        default=60.0,
        ge=0,
        description="Longest Retry-After honoured; a longer one ends the retries.",
    )
    deadline_s: float | None = Field(
        default=600.0,
        gt=0,
        description="Overall deadline of one call, all attempts and waits; None = none.",
    )

    @classmethod
    def none(cls) -> HTTPRetryPolicy:
        """A policy that makes exactly one attempt."""
        return cls(max_attempts=1)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The full-jitter wait before retry number ``retry`` (0 for the first retry)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** min(retry, 62))
        return (rng or random).uniform(0.0, ceiling)


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt."""
    return status in (408, 429) or (500 <= status <= 599 and status not in _PERMANENT_5XX)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date).

    Returns ``None`` when the header is absent or unreadable; a date in the past is 0.

    Examples:
        >>> parse_retry_after("3")
        3.0
        >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=datetime(2015, 10, 21, 7, 27, 30, tzinfo=timezone.utc))
        30.0
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds != seconds or seconds == float("inf"):  # NaN or inf: unreadable
        return None
    return max(0.0, seconds)
