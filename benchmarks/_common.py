"""What every scenario shares: the run settings, the result rows, the servers, timing helpers."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.seaweedfs import SeaweedFS

if TYPE_CHECKING:
    from dagster_octoai.io_managers import S3ImageIOManager

__all__ = [
    "TOKEN",
    "Row",
    "Settings",
    "cpu_seconds",
    "machine",
    "octoai_server",
    "peak_rss_mb",
    "s3_image_io_manager",
    "seaweedfs",
    "shared_seaweedfs",
    "timed",
]

#: The bearer token of every benchmark server (a local throwaway, never a real one).
TOKEN = "bench-token"
#: SeaweedFS volumes of 1 GB: with the test suite's 64 MB a new volume is grown every ~45
#: images of 1.5 MB, a stall that lands on whichever side is writing (P3 pairs ranged
#: 0.6x-1.2x with 64 MB volumes, 0.84x-1.06x with 1 GB ones). S3 itself has no such step.
VOLUME_SIZE_LIMIT_MB = 1024


@dataclass(frozen=True)
class Settings:
    """How big a run is: ``quick`` shrinks every count (the smoke test), never the shape."""

    quick: bool = False
    reps: int = 3

    def n(self, full: int, quick: int) -> int:
        """``full`` in a real run, ``quick`` in a smoke run."""
        return quick if self.quick else full


Comparison = Literal["<=", ">="]


@dataclass
class Row:
    """One line of the results table: a figure (median, min, max of the samples) and its target.

    ``samples`` are the figure of each repetition; ``details`` holds the absolute numbers
    behind it (times, sizes, counts) for the record; ``checks`` are conditions that do
    not depend on speed (they must hold even in a --quick run).
    """

    id: str
    scenario: str
    baseline: str
    figure: str
    unit: str
    samples: list[float]
    target: float | None
    comparison: Comparison = "<="
    details: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    #: "median" for a typical-case target; "max" when every sample must meet it.
    judge: Literal["median", "max"] = "median"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def passed(self) -> bool | None:
        """Whether the median meets the target and every check holds (``None``: no target)."""
        if self.target is None:
            return None
        value = self.median if self.judge == "median" else self.high
        met = value <= self.target if self.comparison == "<=" else value >= self.target
        return met and all(self.checks.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, min=self.low, max=self.high, passed=self.passed)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        """A row back from ``benchmarks.json`` (to re-render the page without re-running)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads, in seconds.

    ``time.process_time`` reads ``CLOCK_PROCESS_CPUTIME_ID``: the same sum as
    ``getrusage(RUSAGE_SELF)`` but to the nanosecond instead of the scheduler tick.
    """
    return time.process_time()


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the peak of this address space only.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``exec``: a child started by a big
    parent reports the parent's RSS at fork time (983 MB in a full run, for a run that
    peaked at 234 MB). Elsewhere, ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


@contextlib.contextmanager
def octoai_server(
    *, mode: Literal["thread", "process"] = "process", **fields: Any
) -> Iterator[LocalOctoAIServer]:
    """The local OctoAI-compatible server, by default in a child process (it must not
    share this process's CPU time or GIL with the client being measured)."""
    with LocalOctoAIServer(ServerConfig(token=TOKEN, **fields), mode=mode) as server:
        yield server


_SHARED_S3: list[SeaweedFS] = []


@contextlib.contextmanager
def seaweedfs() -> Iterator[SeaweedFS]:
    """A SeaweedFS S3 gateway on loopback: the run's shared one, or one of its own."""
    if _SHARED_S3:
        yield _SHARED_S3[0]
        return
    with SeaweedFS(volume_size_limit_mb=VOLUME_SIZE_LIMIT_MB) as s3:
        yield s3


@contextlib.contextmanager
def shared_seaweedfs() -> Iterator[SeaweedFS]:
    """One SeaweedFS for every scenario of a run (each uses its own bucket); stopped at the end."""
    with SeaweedFS(volume_size_limit_mb=VOLUME_SIZE_LIMIT_MB) as s3:
        _SHARED_S3.append(s3)
        try:
            yield s3
        finally:
            _SHARED_S3.clear()


def s3_image_io_manager(s3: SeaweedFS, bucket: str, prefix: str, **fields: Any) -> S3ImageIOManager:
    """An ``S3ImageIOManager`` on this SeaweedFS (path-style addressing); ``fields`` add to it."""
    # Imported here: the scenarios without S3 (P1, P2) need not load Dagster.
    from dagster_octoai.io_managers import S3ImageIOManager

    return S3ImageIOManager(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        addressing_style="path",
        **fields,
    )


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of ``fn()``."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def machine() -> dict[str, Any]:
    """Where the numbers were measured: absolute times only mean something here."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
