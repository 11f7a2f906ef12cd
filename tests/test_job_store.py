"""The durable async job store: one interface over a directory, S3 and memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dagster_octoai import (
    APIStatusError,
    ConnectionFailedError,
    JobExpiredError,
    JobUnknownError,
    OctoAIClient,
)
from dagster_octoai.api.models import JobStatus
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.server.jobstore import JobStore, MemoryBackend, StoredJob
from dagster_octoai.storage.backends import LocalBackend, S3Backend, Versioned
from dagster_octoai.testing.seaweedfs import SeaweedFS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["memory", "local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "memory":
        yield JobStore(MemoryBackend())
    elif request.param == "local":
        yield JobStore(LocalBackend(tmp_path / "jobs"))
    else:
        seaweedfs: SeaweedFS = request.getfixturevalue("seaweedfs")
        bucket: str = request.getfixturevalue("s3_bucket")
        backend = S3Backend(seaweedfs.client(), bucket)
        yield JobStore(backend, "endpoint-a/")


def _claim(job: StoredJob) -> StoredJob | None:
    if job.status is not JobStatus.PENDING:
        return None
    return job.evolve(status=JobStatus.RUNNING, attempts=job.attempts + 1)


def test_a_job_round_trips_and_only_one_of_racing_claims_wins(store: JobStore) -> None:
    job = store.create("alice", "sdxl", b'{"prompt":"a fox"}', {"prompt": "a fox"})
    assert store.input(job.response_id) == b'{"prompt":"a fox"}'
    read = store.read(job.response_id)
    assert read == job and read.request == {"prompt": "a fox"}
    wins: list[StoredJob] = []
    barrier = threading.Barrier(4)

    def claim() -> None:
        barrier.wait()
        if (won := store.swap(job.response_id, _claim)) is not None:
            wins.append(won)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and wins[0].attempts == 1
    assert store.read(job.response_id).status is JobStatus.RUNNING  # type: ignore[union-attr]
    # Two runs of one job, one answer: the first result written stays.
    store.put_result(job.response_id, b"first")
    store.put_result(job.response_id, b"second")
    assert store.result(job.response_id) == b"first"
    store.finish_files(job.response_id)
    assert store.input(job.response_id) is None
    assert [rid for rid, _ in store.ids()] == [job.response_id]
    assert store.delete(job.response_id)
    assert store.read(job.response_id) is None and store.result(job.response_id) is None


def test_ids_tell_expired_from_unknown_across_store_instances(store: JobStore) -> None:
    job = store.create("alice", "sd", b"{}")
    again = JobStore(store.backend, store.prefix)  # a restarted server on the same store
    assert again.owner_key == store.owner_key
    assert again.read(job.response_id) == job
    assert again.origin(job.response_id) == "ours"
    forged = job.response_id[:-1] + ("0" if job.response_id[-1] != "0" else "1")
    assert again.origin(forged) == "unknown"
    assert again.read(forged) is None
    assert JobStore(MemoryBackend()).origin(job.response_id) == "unknown"


def test_an_idempotency_key_binds_its_first_response_id_until_the_ttl(store: JobStore) -> None:
    first = store.remember("alice", "key-1", "digest-a", "rid-1", ttl_s=60)
    assert first.response_id == "rid-1"
    assert store.remember("alice", "key-1", "digest-b", "rid-2", ttl_s=60) == first
    # Another owner's key of the same name is another key.
    assert store.remember("bob", "key-1", "digest-b", "rid-3", ttl_s=60).response_id == "rid-3"
    time.sleep(0.05)
    assert store.remember("alice", "key-1", "digest-b", "rid-4", ttl_s=0.01).response_id == "rid-4"


def test_past_max_queued_jobs_a_submission_is_429_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    config = ServerConfig(
        token="t0k", state_dir=str(tmp_path), max_queued_jobs=2, async_queue_delay_s=3600
    )
    with LocalOctoAIServer(config) as srv:
        headers = {"Authorization": "Bearer t0k", "X-OctoAI-Async": "1"}
        with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as client:
            answers = [client.post("/generate/sd", json={"prompt": "x"}) for _ in range(3)]
            assert [a.status_code for a in answers] == [201, 201, 429]
            assert int(answers[2].headers["Retry-After"]) >= 1
            assert "2 async jobs are queued" in answers[2].json()["message"]
            polls = [client.get(a.json()["poll_url"]).json() for a in answers[:2]]
        assert [p["queue_position"] for p in polls] == [0, 1]
        assert srv.stats()["async_jobs"]["pending"] == 2
    assert len(list((tmp_path / "jobs").iterdir())) == 2


def test_the_client_tells_an_expired_result_from_an_unknown_id(tmp_path: Path) -> None:
    config = ServerConfig(
        token="t0k", extra_tokens=["other"], state_dir=str(tmp_path), result_ttl_s=1.0
    )
    with (
        LocalOctoAIServer(config) as srv,
        OctoAIClient(token="t0k", base_url=srv.url) as client,
        OctoAIClient(token="other", base_url=srv.url) as other,
    ):
        job = client.submit({"prompt": "a fox", "seed": 1}, engine="sd")
        client.wait(job, timeout=30)
        # Another token's job is as unknown as a wrong id: its existence is not confirmed.
        with pytest.raises(JobUnknownError):
            other.poll(job.poll_url)
        with pytest.raises(JobUnknownError, match="unknown here"):
            client.poll(job.poll_url.replace(job.response_id, "0000000000-" + "0" * 38))
        time.sleep(1.1)
        with pytest.raises(JobExpiredError, match="expired"):
            client.poll(job)


def test_an_idempotency_key_pays_once_and_refuses_another_body(tmp_path: Path) -> None:
    config = ServerConfig(token="t0k", state_dir=str(tmp_path), latency_per_image_s=0.2)
    with LocalOctoAIServer(config) as srv, OctoAIClient(token="t0k", base_url=srv.url) as client:
        # The first POST's answer is lost on the wire, after the job was stored.
        srv.configure(faults={"drop_after_render": 1.0, "on_async_routes": False})
        request = {"prompt": "a fox", "seed": 1}
        with pytest.raises(ConnectionFailedError):
            client.submit(request, engine="sd", idempotency_key="order-17")
        srv.configure(faults={"drop_after_render": 0.0})
        job = client.submit(request, engine="sd", idempotency_key="order-17")
        again = client.submit(request, engine="sd", idempotency_key="order-17")
        assert again.response_id == job.response_id
        client.wait(job, timeout=30)
        assert srv.stats()["paid_generations"] == 1
        with pytest.raises(APIStatusError, match="Idempotency-Key") as refused:
            client.submit({"prompt": "a cat", "seed": 1}, engine="sd", idempotency_key="order-17")
        assert refused.value.status_code == 409
        # Sync requests too: the repeat gets the first answer, unpaid.
        headers = {"Authorization": "Bearer t0k", "Idempotency-Key": "sync-1"}
        first = httpx.post(f"{srv.url}/generate/sd", json=request, headers=headers, timeout=30)
        second = httpx.post(f"{srv.url}/generate/sd", json=request, headers=headers, timeout=30)
        assert first.status_code == second.status_code == 200
        assert first.content == second.content
        assert srv.stats()["paid_generations"] == 2
        other = httpx.post(
            f"{srv.url}/generate/sd", json={"prompt": "x"}, headers=headers, timeout=30
        )
        assert other.status_code == 409
        bad = httpx.post(
            f"{srv.url}/generate/sd",
            json=request,
            headers={**headers, "Idempotency-Key": "has space"},
            timeout=30,
        )
        assert bad.status_code == 422 and "Idempotency-Key" in bad.text


def test_the_ledger_sends_one_key_per_response_it_replaces() -> None:
    from datetime import timedelta

    from dagster_octoai.api.models import ImageGenerationRequest
    from dagster_octoai.storage.ledger import JobRecord

    req = ImageGenerationRequest(prompt="a fox", seed=1)
    first = JobRecord.new(req, asset_key="images", partition_key=None, job_id="j1")
    # A POST retried after its answer was lost: the same key, so the server's first job.
    assert first.evolve(attempts=2, error="submission failed").idempotency_key == (
        first.idempotency_key
    )
    # Replacing a response the server gave up (expired, failed): a new key.
    assert first.evolve(response_id="r1").idempotency_key != first.idempotency_key
    # The same request in another ledger (or made again later) is another job.
    later = first.evolve(created_at=first.created_at + timedelta(microseconds=1))
    assert later.idempotency_key != first.idempotency_key


def test_delete_cancels_a_pending_and_a_running_job(tmp_path: Path) -> None:
    from dagster_octoai import JobCancelledError

    config = ServerConfig(token="t0k", state_dir=str(tmp_path), replicas=1, latency_per_image_s=30)
    with LocalOctoAIServer(config) as srv, OctoAIClient(token="t0k", base_url=srv.url) as client:
        running = client.submit({"prompt": "a fox", "seed": 1}, engine="sd")
        pending = client.submit({"prompt": "a fox", "seed": 2}, engine="sd")
        headers = {"Authorization": "Bearer t0k"}
        with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as http:
            deadline = time.monotonic() + 20
            while http.get(f"/v1/requests/{running.response_id}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert http.get(f"/v1/requests/{pending.response_id}").json()["queue_position"] == 0
            # Another token cannot cancel it: to them it is unknown.
            assert (
                http.delete(
                    f"/v1/requests/{pending.response_id}",
                    headers={"Authorization": "Bearer nope"},
                ).status_code
                == 401
            )
            assert client.cancel(pending).status.value == "cancelled"
            started = time.monotonic()
            assert http.delete(f"/v1/requests/{running.response_id}").status_code == 200
            with pytest.raises(JobCancelledError):
                client.wait(running, timeout=20)
            assert time.monotonic() - started < 10  # not the 30 s the image would take
            assert http.get(f"/v1/responses/{pending.response_id}").status_code == 409
        with pytest.raises(JobCancelledError):
            client.wait(pending, timeout=5)
        stats = srv.stats()
        assert stats["paid_generations"] == 0
        assert stats["async_jobs"]["cancelled"] == 2


def test_a_sync_request_whose_client_left_is_cancelled_and_frees_its_replica() -> None:
    config = ServerConfig(token="t0k", replicas=1, latency_per_image_s=2.0)
    with LocalOctoAIServer(config) as srv:
        headers = {"Authorization": "Bearer t0k"}
        body = {"prompt": "a fox", "seed": 1, "num_images": 16}  # 32 s on the only replica
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/generate/sd", json=body, headers=headers, timeout=1.0)
        started = time.monotonic()
        after = httpx.post(
            f"{srv.url}/generate/sd", json={"prompt": "x"}, headers=headers, timeout=60
        )
        assert after.status_code == 200
        assert time.monotonic() - started < 15  # not behind the abandoned 32 s
        stats = srv.stats()
        assert stats["disconnected_cancels"] == 1
        assert stats["paid_generations"] == 1


def test_two_servers_on_one_s3_store_run_each_job_once(
    seaweedfs: SeaweedFS, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", seaweedfs.region)
    config = ServerConfig(
        token="t0k",
        jobs_url=f"s3://{s3_bucket}/endpoint",
        jobs_endpoint_url=seaweedfs.endpoint_url,
        async_sweep_interval_s=0.2,
        async_queue_delay_s=0.5,  # both servers see every job pending before it runs
        latency_per_image_s=0.2,
    )
    with LocalOctoAIServer(config) as a, LocalOctoAIServer(config) as b:
        with OctoAIClient(token="t0k", base_url=a.url) as on_a:
            jobs = [on_a.submit({"prompt": "a fox", "seed": s}, engine="sd") for s in range(4)]
            results = [on_a.wait(job, timeout=60) for job in jobs]
        # Any server answers for any job, with the same bytes.
        with OctoAIClient(token="t0k", base_url=b.url) as on_b:
            again = [on_b.fetch(f"{b.url}/v1/responses/{job.response_id}") for job in jobs]
        assert [r.images[0].image_b64 for r in results] == [r.images[0].image_b64 for r in again]
        assert a.stats()["paid_generations"] + b.stats()["paid_generations"] == 4


class _CountingBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.record_reads = 0

    def get_versioned(self, key: str) -> Versioned | None:
        if key.endswith("record.json"):
            self.record_reads += 1
        return super().get_versioned(key)


def test_a_swap_after_this_processs_own_write_reads_nothing_and_another_writer_is_seen() -> None:
    backend = _CountingBackend()
    mine, other = JobStore(backend), JobStore(backend)
    job = mine.create("alice", "sd", b"{}")
    claimed = mine.swap(job.response_id, lambda j: j.evolve(status=JobStatus.RUNNING))
    assert claimed is not None and backend.record_reads == 0
    # Another process writes between: the guess from the last write fails its conditional
    # write, and the change is made on the record as it is now.
    cancelled = other.swap(job.response_id, lambda j: j.evolve(cancel_requested=True))
    assert cancelled is not None
    renewed = mine.swap(job.response_id, lambda j: j.evolve(lease_until=1.0))
    assert renewed is not None and renewed.cancel_requested and renewed.lease_until == 1.0


def test_a_poll_is_answered_without_a_read_only_where_no_other_writer_can_change_it() -> None:
    backend = _CountingBackend()
    mine, other = JobStore(backend), JobStore(backend)
    job = mine.create("alice", "sd", b"{}")
    rid = job.response_id
    # Pending, written here just now: served for stale_s, then read again.
    assert mine.cached(rid, "me", stale_s=60) == job
    assert mine.cached(rid, "me", stale_s=0) is None
    # Another frontend claims it: this one sees that once its kept record is stale.
    theirs = other.swap(rid, lambda j: j.evolve(status=JobStatus.RUNNING, holder="them"))
    assert theirs is not None and mine.cached(rid, "me", stale_s=0) is None
    assert mine.read(rid) == theirs
    # Running under this holder with a live lease: only the holder changes its status.
    held = other.swap(rid, lambda j: j.evolve(lease_until=time.time() + 60))
    assert held is not None and other.cached(rid, "them", stale_s=0) == held
    assert other.cached(rid, "someone else", stale_s=0) is None
    lapsed = other.swap(rid, lambda j: j.evolve(lease_until=time.time() - 1))
    assert lapsed is not None and other.cached(rid, "them", stale_s=0) is None
    # Finished: final, kept by the writer, and by a reader after one read.
    done = other.swap(rid, lambda j: j.evolve(status=JobStatus.COMPLETED, finished_at=1.0))
    assert done is not None and other.cached(rid, "them", stale_s=0) == done
    reads = backend.record_reads
    assert mine.read(rid) == done and backend.record_reads == reads + 1
    assert mine.cached(rid, "me", stale_s=0) == done


def test_a_sweep_reads_the_open_jobs_and_none_of_the_finished_ones() -> None:
    import asyncio

    from dagster_octoai.server.jobqueue import JobQueue
    from dagster_octoai.server.jobs import ReplicaPool
    from dagster_octoai.server.stats import ServerStats

    backend = _CountingBackend()
    store = JobStore(backend)
    for _ in range(20):
        rid = store.create("alice", "sd", b"{}").response_id
        store.put_result(rid, b"{}")
        store.swap(rid, lambda j: j.evolve(status=JobStatus.COMPLETED, finished_at=time.time()))
        store.finish_files(rid)
    pending = store.create("alice", "sd", b"{}").response_id
    # A new process on the store: nothing kept from the writes above.
    fresh = JobStore(backend)
    config = ServerConfig(token="t", result_ttl_s=3600)

    async def sweep() -> list[str]:
        async def never(*_: object) -> bytes:
            raise AssertionError("nothing runs in this test")

        queue = JobQueue(
            fresh,
            config=lambda: config,
            pool=ReplicaPool(lambda: 0, lambda *_: None),
            render=never,
            stats=ServerStats(),
        )
        # The sweep's reads, not its queueing: the store part alone.
        found, leftover = await asyncio.to_thread(queue._sweep_store)
        assert leftover == []
        return found

    backend.record_reads = 0
    assert asyncio.run(sweep()) == [pending]
    assert backend.record_reads == 1  # the pending job's record, none of the 20 finished
