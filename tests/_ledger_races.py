"""Racing sensor ticks and runs on one job ledger, in threads and in child processes.

Every racer first reads what it races for, then waits at a barrier until all the others
have read it too, so the race is certain, not left to timing: whatever each does next,
it does on the same stale read. Children come from a ``forkserver`` that imported
Dagster and this package once (a fresh interpreter per child costs seconds here); each
writes what it saw as JSON for the test to read.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.models import AsyncJob, PollResult
from dagster_octoai.async_assets import (
    octoai_async_blocking_asset,
    octoai_async_results_asset,
    octoai_async_submit_asset,
)
from dagster_octoai.io_managers import LocalImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.sensors import octoai_async_sensor
from dagster_octoai.storage.ledger import JobLedger
from dagster_octoai.storage.ticker import AsyncSensorSettings

#: One explicit-seed request per partition: the same partition asks for the same image.
PARTITIONS = dg.StaticPartitionsDefinition(["harbour"])
_REQUEST = {"engine": "sd", "steps": 2, "seed": 4242}

_PRELOAD = [
    "dagster",
    "boto3",
    "httpx",
    "sqlalchemy",
    "dagster._core.execution.execute_in_process",
    "PIL.Image",
    "dagster_octoai.async_assets",
    "dagster_octoai.io_managers",
    "dagster_octoai.sensors",
    "_ledger_races",
]
_context: Any = None


def mp() -> Any:
    """The fork server's multiprocessing context (started on first use)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def ledger_resource(place: dict[str, Any]) -> JobLedgerResource:
    """The ledger resource of ``place``: ``{"base_dir": ...}`` or the S3 bucket's fields."""
    if "base_dir" in place:
        return JobLedgerResource(base_dir=place["base_dir"], fsync=False)
    return JobLedgerResource(**place)


class MeetingClient(OctoAIClient):
    """A client whose polls end at a barrier: every tick has read and polled before any acts."""

    def __init__(self, *args: Any, barrier: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._barrier = barrier

    def poll(self, job: AsyncJob | str) -> PollResult:
        try:
            return super().poll(job)
        finally:
            self._barrier.wait(timeout=120)


def sensor_definitions(place: dict[str, Any], server_url: str, token: str, barrier: Any) -> Any:
    """The results asset and the async sensor whose poll client meets at ``barrier``."""
    results = octoai_async_results_asset("harbour_images")

    def client(context: Any, settings: Any) -> OctoAIClient:
        return MeetingClient(token, base_url=server_url, timeout=20.0, barrier=barrier)

    sensor = octoai_async_sensor(
        asset=results, client_factory=client, settings=AsyncSensorSettings(max_resubmits=3)
    )
    resources = {
        "octoai": OctoAIResource(token=token, base_url=server_url),
        "octoai_ledger": ledger_resource(place),
    }
    return results, sensor, resources


def evaluate_tick(
    place: dict[str, Any], server_url: str, token: str, barrier: Any
) -> dict[str, Any]:
    """One evaluation of the async sensor; what it asked for and what it logged."""
    results, sensor, resources = sensor_definitions(place, server_url, token, barrier)
    defs = dg.Definitions(assets=[results], sensors=[sensor], resources=resources)
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(
            instance=instance,
            # With the ref, a tick that asks for a run can check the dynamic partitions.
            instance_ref=instance.get_ref(),
            definitions=defs,
            resources=resources,
        ) as ctx,
    ):
        data = sensor.evaluate_tick(ctx)
    return {
        "run_keys": [r.run_key for r in data.run_requests],
        "skip_reason": str(data.skip_message or ""),
    }


@contextmanager
def meet_after_first_read(barrier: Any, meetings: int = 1) -> Iterator[None]:
    """Make the first ``meetings`` calls of ``JobLedger.get`` in this process wait at ``barrier``.

    One per racing run: each run's first read then waits for every other run's, and
    later reads (a loser re-reading the winner's record) go through.
    """
    original = JobLedger.get
    lock = threading.Lock()
    left = [meetings]

    @functools.wraps(original)
    def get(self: JobLedger, job_id: str) -> Any:
        record = original(self, job_id)
        with lock:
            meet = left[0] > 0
            left[0] -= 1
        if meet:
            barrier.wait(timeout=120)
        return record

    JobLedger.get = get  # type: ignore[method-assign]
    try:
        yield
    finally:
        JobLedger.get = original  # type: ignore[method-assign]


def submit_asset() -> dg.AssetsDefinition:
    """The submit asset of one explicit-seed request per partition."""
    results = octoai_async_results_asset("harbour_images")

    def requests(context: dg.AssetExecutionContext) -> list[dict[str, Any]]:
        return [{**_REQUEST, "prompt": f"a {context.partition_key} at dawn"}]

    return octoai_async_submit_asset(
        "harbour_jobs", requests, results_asset=results, partitions_def=PARTITIONS
    )


def blocking_asset() -> dg.AssetsDefinition:
    """The blocking async asset of the same request."""

    def requests(context: dg.AssetExecutionContext) -> list[dict[str, Any]]:
        return [{**_REQUEST, "prompt": f"a {context.partition_key} at dawn"}]

    return octoai_async_blocking_asset(
        "harbour_blocking", requests, partitions_def=PARTITIONS, wait_timeout_s=60
    )


def run_partition(
    asset: dg.AssetsDefinition,
    place: dict[str, Any],
    server_url: str,
    token: str,
    images_dir: str,
) -> dict[str, Any]:
    """Materialize the ``harbour`` partition of ``asset``; its step's materialization metadata.

    Each run stores its images in a directory of its own: these tests race the ledger,
    not the image store.
    """
    own_dir = tempfile.mkdtemp(
        dir=Path(images_dir).mkdir(parents=True, exist_ok=True) or images_dir
    )
    resources = {
        "octoai": OctoAIResource(token=token, base_url=server_url, max_attempts=2),
        "octoai_ledger": ledger_resource(place),
        "io_manager": LocalImageIOManager(base_dir=own_dir, prefix="img"),
    }
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [asset],
            partition_key="harbour",
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        metadata: dict[str, Any] = {}
        for mat in result.asset_materializations_for_node(asset.op.name):
            metadata = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        errors = [
            ev.step_failure_data.error.to_string() if ev.step_failure_data.error else "?"
            for ev in result.get_step_failure_events()
        ]
        return {"success": result.success, "metadata": _plain(metadata), "errors": errors}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---- child processes ------------------------------------------------------------------


def _child_tick(place: dict[str, Any], url: str, token: str, barrier: Any, out: str) -> None:
    Path(out).write_text(json.dumps(evaluate_tick(place, url, token, barrier)))


def _child_run(
    kind: str, place: dict[str, Any], url: str, token: str, images: str, barrier: Any, out: str
) -> None:
    asset = submit_asset() if kind == "submit" else blocking_asset()
    with meet_after_first_read(barrier):
        answer = run_partition(asset, place, url, token, images)
    Path(out).write_text(json.dumps(answer))


def in_processes(
    n: int, target: Callable[..., None], args: tuple[Any, ...], tmp: Path
) -> list[dict[str, Any]]:
    """Run ``target(*args, barrier, out)`` in ``n`` children at once; what each wrote."""
    ctx = mp()
    barrier = ctx.Barrier(n)
    outs = [tmp / f"child-{i}.json" for i in range(n)]
    procs = [
        ctx.Process(target=target, args=(*args, barrier, str(out)), daemon=True) for out in outs
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(240)
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
            proc.join(10)
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * n, f"children exited with {codes}"
    return [json.loads(out.read_text()) for out in outs]


def in_threads(n: int, target: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``target(barrier)`` in ``n`` threads at once; their answers (or the first error)."""
    barrier = threading.Barrier(n)
    answers: list[Any] = [None] * n

    def work(i: int) -> None:
        try:
            answers[i] = target(barrier)
        except BaseException as exc:  # re-raised below, in the test's thread
            answers[i] = exc
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers


child_tick = _child_tick
child_run = _child_run
