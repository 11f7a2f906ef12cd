"""The request log: what the server answered, how many images it rendered (paid for).

Tests assert on these numbers ("the client retried twice and paid for one generation")
through ``GET /_local/stats``, so every count is exact and none depends on timing.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CURRENT_RECORD", "RequestRecord", "ServerStats"]

LOG_SIZE = 1000


@dataclass
class RequestRecord:
    """One answered (or dropped) request, as kept in the bounded request log."""

    request_id: str
    method: str
    route: str
    path: str
    status: int | None  # None: the connection was dropped without an answer
    started_at: float
    duration_ms: float = 0.0
    fault: str | None = None
    engine: str | None = None
    images: int = 0
    seeds: list[int] = field(default_factory=list)
    response_id: str | None = None
    #: The replica that generated the images, where a deployment has several (Ray Serve).
    replica: str | None = None


#: The record of the request being answered, for code below the routes (a deployment's
#: generate) to note what it knows, such as the replica that served it.
CURRENT_RECORD: ContextVar[RequestRecord | None] = ContextVar("octoai_record", default=None)


class ServerStats:
    """Counters of one server. Only the event loop's thread touches them."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every count and the request log (in-flight generations keep running)."""
        self.requests: Counter[tuple[str, str]] = Counter()
        self.faults: Counter[str] = Counter()
        self.generations_by_engine: Counter[str] = Counter()
        self.images_by_engine: Counter[str] = Counter()
        self.generation_requests = 0
        self.paid_images = 0
        self.removed_for_safety = 0
        self.rate_limited = 0
        self.policy_rejections = 0
        self.validation_errors = 0
        self.async_submitted = 0
        self.async_expired = 0
        #: Sync generations cancelled because their client disconnected.
        self.disconnected_cancels = 0
        self.in_flight_max = 0
        self.queued_max = 0
        self.log: deque[RequestRecord] = deque(maxlen=LOG_SIZE)
        self.started_at = time.time()

    def record_answer(self, record: RequestRecord) -> None:
        status = "dropped" if record.status is None else str(record.status)
        self.requests[(f"{record.method} {record.route}", status)] += 1
        self.log.append(record)

    def record_generation(self, engine: str, images: int, removed: int) -> None:
        self.generation_requests += 1
        self.generations_by_engine[engine] += 1
        self.paid_images += images
        self.images_by_engine[engine] += images
        self.removed_for_safety += removed

    def observe_pool(self, in_flight: int, queued: int) -> None:
        self.in_flight_max = max(self.in_flight_max, in_flight)
        self.queued_max = max(self.queued_max, queued)

    def snapshot(
        self, *, in_flight: int, queued: int, jobs_by_status: dict[str, int]
    ) -> dict[str, Any]:
        """Everything as JSON-ready data (the body of ``GET /_local/stats``)."""
        by_route: dict[str, dict[str, int]] = {}
        for (route, status), count in sorted(self.requests.items()):
            by_route.setdefault(route, {})[status] = count
        return {
            "requests": by_route,
            "requests_total": sum(self.requests.values()),
            "paid_generations": self.paid_images,
            "generation_requests": self.generation_requests,
            "generations_by_engine": dict(self.generations_by_engine),
            "images_by_engine": dict(self.images_by_engine),
            "removed_for_safety": self.removed_for_safety,
            "rate_limited": self.rate_limited,
            "policy_rejections": self.policy_rejections,
            "validation_errors": self.validation_errors,
            "disconnected_cancels": self.disconnected_cancels,
            "faults": dict(self.faults),
            "in_flight": in_flight,
            "in_flight_max": self.in_flight_max,
            "queued": queued,
            "queued_max": self.queued_max,
            "async_jobs": {
                **jobs_by_status,
                "submitted": self.async_submitted,
                "expired": self.async_expired,
            },
            "since": self.started_at,
        }

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` request records, oldest first."""
        items = list(self.log)[-limit:] if limit > 0 else []
        return [asdict(r) for r in items]
