"""Replicas: the queueing of the hosted service.

The seed ``endpoints.txt``: "1 GPU can support a single request at a time. Concurrent
requests exceeding the maximum replicas will be placed in a queue until a replica is
available." :class:`ReplicaPool` is that queue, shared by sync requests and async
jobs. Async jobs themselves live in the durable :mod:`~dagster_octoai.server.jobstore`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

__all__ = ["LOST_MESSAGE", "ReplicaPool"]


class ReplicaPool:
    """At most ``replicas`` generations at once; the rest wait in arrival order.

    ``replicas`` is read on every acquire, so a runtime change applies to the queue
    at once. Use as ``async with pool:``.
    """

    def __init__(self, replicas: Callable[[], int], on_change: Callable[[int, int], None]) -> None:
        self._replicas = replicas
        self._on_change = on_change
        self._cond = asyncio.Condition()
        self.in_flight = 0
        self.queued = 0

    async def __aenter__(self) -> None:
        async with self._cond:
            if self.in_flight >= self._replicas():
                self.queued += 1
                self._on_change(self.in_flight, self.queued)
                try:
                    await self._cond.wait_for(lambda: self.in_flight < self._replicas())
                finally:
                    self.queued -= 1
            self.in_flight += 1
            self._on_change(self.in_flight, self.queued)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    async def resized(self) -> None:
        """Wake waiters after ``replicas`` grew."""
        async with self._cond:
            self._cond.notify_all()


#: Why a job whose generator replica died twice failed (Ray Serve).
LOST_MESSAGE = "The replica running this job stopped before it finished; resubmit the request."
