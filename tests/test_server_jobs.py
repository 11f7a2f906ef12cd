"""The async job store's rules: owners, unguessable ids, leases, the first end wins."""

from __future__ import annotations

import time

import pytest

from dagster_octoai.api.models import ImageGenerationRequest, JobStatus
from dagster_octoai.server.jobs import LOST_MESSAGE, JobStore, new_response_id


def _store(ttl_s: float = 60.0) -> JobStore:
    return JobStore(lambda: ttl_s, lambda count: None)


def test_response_ids_are_128_random_bits_in_the_services_shape() -> None:
    ids = {new_response_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        head, _, tail = rid.partition("-")
        assert len(head) == 10 and len(head + tail) == 32
        int(head + tail, 16)


def test_a_job_is_visible_to_its_owner_and_the_admin_only() -> None:
    store = _store()
    job = store.add(ImageGenerationRequest(prompt="x"), fails=False, owner="alice")
    assert store.view(job.response_id, "alice") is not None
    assert store.view(job.response_id, "bob") is None
    assert store.view(job.response_id, "bob", admin=True) is not None
    assert store.view("no-such-id", "alice", admin=True) is None


def test_a_lapsed_lease_fails_the_job_and_a_late_answer_changes_nothing() -> None:
    store = _store()
    job = store.add(None, fails=False, owner="alice", lease_s=0.2)
    store.renew([job.response_id], 0.2)
    assert store.view(job.response_id, "alice").status is JobStatus.PENDING  # type: ignore[union-attr]
    time.sleep(0.3)
    view = store.view(job.response_id, "alice")
    assert view is not None and view.status is JobStatus.FAILED and view.error == LOST_MESSAGE
    assert store.by_status()["failed"] == 1
    # The replica that was presumed dead answers after all: the first end stands.
    job.finish(JobStatus.COMPLETED, body=b"{}")
    assert store.view(job.response_id, "alice", with_body=True).body is None  # type: ignore[union-attr]


def test_a_job_without_a_lease_never_lapses() -> None:
    store = _store()
    job = store.add(None, fails=False, owner="alice")
    time.sleep(0.05)
    assert store.view(job.response_id, "alice").status is JobStatus.PENDING  # type: ignore[union-attr]


@pytest.mark.parametrize("ttl_s", [0.05])
def test_finished_jobs_expire(ttl_s: float) -> None:
    store = _store(ttl_s)
    job = store.add(None, fails=False, owner="alice", lease_s=10)
    job.finish(JobStatus.COMPLETED, body=b"{}")
    assert job.lease_until is None  # an ended job holds no lease
    time.sleep(ttl_s * 2)
    assert store.view(job.response_id, "alice") is None
