"""The polling schedule of one wait on an async job (image or video), shared by the clients."""

from __future__ import annotations

import logging
import time
from typing import TypeAlias

from .errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    JobNotReadyError,
    OctoAIError,
    ServerError,
)
from .models import AsyncJob, JobStatus, PollResult
from .video import VideoJob

logger = logging.getLogger("dagster_octoai.api.client")

#: A submitted job of either kind: both carry ``response_id``, ``poll_url`` and ``request``.
AnyJob: TypeAlias = AsyncJob | VideoJob


def _label(response_id: str | None) -> str:
    return f" {response_id}" if response_id else ""


def _not_ready(job: AnyJob, result: PollResult) -> JobNotReadyError:
    return JobNotReadyError(
        f"async job {job.response_id} is {result.raw_status!r}, not completed; "
        "call wait(job) or poll again later",
        response_id=job.response_id,
    )


class _JobWait:
    """The polling schedule of one ``wait(job)``: back-off, deadline, unknown statuses.

    The clients' loops are: poll; done -> fetch; else sleep ``pause(result)``, then
    ``check(result)`` (raises once the deadline has passed).
    """

    def __init__(
        self, job: AnyJob, timeout: float, poll_interval_s: float, max_poll_interval_s: float
    ) -> None:
        self.job = job
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._interval = poll_interval_s
        self._max_interval = max_poll_interval_s
        self._warned: set[str] = set()

    def pause(self, result: PollResult) -> float:
        """Seconds to sleep before the next poll (none left once the deadline has passed)."""
        if result.status is JobStatus.UNKNOWN and result.raw_status not in self._warned:
            self._warned.add(result.raw_status)
            logger.warning(
                "job %s: unknown status %r; polling on until the %g s timeout",
                self.job.response_id,
                result.raw_status,
                self.timeout,
            )
        return max(0.0, min(self._interval, self.deadline - time.monotonic()))

    def check(self, result: PollResult | None) -> None:
        """Raise when the deadline has passed; else back the interval off."""
        if time.monotonic() >= self.deadline:
            raise DeadlineExceededError(
                f"async job {self.job.response_id} still "
                f"{'unreachable' if result is None else repr(result.raw_status)} after waiting "
                f"{self.timeout:g} s; wait(job) again or fetch it later (results are kept "
                "24 hours)",
                response_id=self.job.response_id,
            )
        self._interval = min(self._interval * 2, self._max_interval)

    def outage(self, exc: OctoAIError) -> float:
        """The pause after a poll or fetch that found no server; raises what is not one.

        A server that restarts (a deploy, a crash) refuses connections or its proxy
        answers 502/503/504 for a while; its jobs survive, so the wait goes on until its
        own deadline instead of giving up with the call's retries.
        """
        transient = isinstance(exc, ConnectionFailedError) or (
            isinstance(exc, ServerError) and exc.status_code in (502, 503, 504)
        )
        if not transient or time.monotonic() >= self.deadline:
            raise exc
        logger.info("job %s: server unreachable, polling on: %s", self.job.response_id, exc)
        return max(0.0, min(self._interval, self.deadline - time.monotonic()))
