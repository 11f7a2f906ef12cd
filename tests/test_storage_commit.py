"""The image store's commit protocol, on SeaweedFS and on a local directory.

Objects are written once under keys no other write uses, the manifest is the one commit
point (a conditional write), and what a commit retires is deleted only after it. These
tests kill writers (SIGKILL, in child processes) and fail them (an exception) before each
step of the protocol, race N writers of one output, mix up outputs whose keys used to
collide, corrupt manifests, and clean up after killed runs; after each, the committed
output must read back whole, byte for byte, and nothing but it may be left.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from _store_children import (
    answer,
    killed_write,
    mp,
    picture,
    racing_write,
    run_children,
    store_of,
)
from hypothesis import given, settings, strategies as st

from dagster_octoai.storage import ImageStore, StorageBackend, StorageError
from dagster_octoai.storage.layout import OBJECTS_DIR, legacy_output_key, output_key
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by this module

LATER = datetime.now(timezone.utc) + timedelta(days=3)


@pytest.fixture(params=["s3", "local"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Where the store lives, as a child process can rebuild it."""
    if request.param == "local":
        return {"base_dir": str(tmp_path / "images")}
    s3: SeaweedFS = request.getfixturevalue("seaweedfs")
    return {
        "bucket": request.getfixturevalue("s3_bucket"),
        "endpoint_url": s3.endpoint_url,
        "region": s3.region,
        "access_key": s3.access_key,
        "secret_key": s3.secret_key,
    }


@pytest.fixture
def store(place: dict[str, Any]) -> ImageStore:
    return store_of(place)


def everything(store: ImageStore) -> list[str]:
    return sorted(o.key for o in store.backend.list("gen/"))


def committed_keys(store: ImageStore, asset: list[str], partition: str | None) -> list[str]:
    manifest = store.read_manifest(asset, partition)
    assert manifest is not None
    return [im["key"] for r in manifest["results"] for im in r["images"] if im["key"]]


def assert_whole(
    store: ImageStore, asset: list[str], partition: str | None, pictures: list[bytes]
) -> None:
    """The output reads back as exactly ``pictures``, and nothing else is stored for it."""
    assert [im.data for im in store.read(asset, partition)] == pictures
    base = store.output_key(asset, partition)
    mine = [k for k in everything(store) if k.startswith(f"{base}/")]
    assert sorted(mine) == sorted(
        [*committed_keys(store, asset, partition), f"{base}/manifest.json"]
    )


FIRST = [picture(1), picture(2)]  # what the first write commits
SECOND = [picture(1), picture(2), picture(53)]  # what the killed or failing write would


def _first_write(store: ImageStore) -> None:
    store.write([answer("a fox", [1, 2])], asset_key=["fox"], partition_key="p1", run_id="first")
    assert_whole(store, ["fox"], "p1", FIRST)


# ---- killed and failing writes ----------------------------------------------------------


def test_a_write_killed_before_any_step_leaves_the_committed_output_whole(
    place: dict[str, Any], store: ImageStore
) -> None:
    _first_write(store)
    outcomes: list[str] = []
    for step in range(1, 15):
        (code,) = run_children(killed_write, [(place, step)])
        if code == 0:
            break  # no step left to die at: the write went through
        assert code == -signal.SIGKILL, code
        manifest = store.read_manifest(["fox"], "p1")
        assert manifest is not None
        # Either the old version or the new one is committed, and it is whole.
        pictures = SECOND if manifest["run_id"] == "killed" else FIRST
        outcomes.append(manifest["run_id"])
        assert [im.data for im in store.read(["fox"], "p1")] == pictures
        # What the killed write left is found and removed, never a committed object.
        report = store.clean_up(now=LATER)
        assert set(report.removed_keys).isdisjoint(committed_keys(store, ["fox"], "p1"))
        assert_whole(store, ["fox"], "p1", pictures)
        if manifest["run_id"] == "killed":
            _first_write(store)  # back to the first version for the next step
    else:
        pytest.fail("the write never completed")
    # Killed before each upload and before the commit (the old version stays), and after
    # the commit, before the retired objects were deleted (the new one is whole).
    assert outcomes.count("first") >= 4 and "killed" in outcomes
    assert_whole(store, ["fox"], "p1", SECOND)


class Failing:
    """A real backend whose ``step``-th mutating call raises, as an outage would."""

    def __init__(self, inner: StorageBackend, step: int) -> None:
        self.inner = inner
        self.step = step
        self.calls = 0
        self.lock = threading.Lock()

    def _tick(self, name: str) -> None:
        with self.lock:
            self.calls += 1
            fail = self.calls == self.step
        if fail:
            raise StorageError(f"simulated outage at step {self.step} ({name})")

    def put(self, *args: Any) -> None:
        self._tick("put")
        self.inner.put(*args)

    def copy(self, *args: Any) -> None:
        self._tick("copy")
        self.inner.copy(*args)

    def put_if(self, *args: Any) -> str:
        self._tick("put_if")
        return self.inner.put_if(*args)

    def delete(self, *args: Any) -> None:
        self._tick("delete")
        self.inner.delete(*args)

    def delete_if(self, *args: Any) -> bool:
        self._tick("delete_if")
        return self.inner.delete_if(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_write_failing_at_any_step_leaves_the_committed_output_whole(store: ImageStore) -> None:
    _first_write(store)
    seen: list[str] = []
    for step in range(1, 15):
        faulty = Failing(store.backend, step)
        failing = ImageStore(faulty, prefix="gen", max_concurrency=2)  # type: ignore[arg-type]
        try:
            failing.write(
                [answer("a fox", [1, 2]), answer("an owl", [3], offset=50)],
                asset_key=["fox"],
                partition_key="p1",
                run_id="failing",
            )
        except StorageError as exc:
            assert f"step {step}" in str(exc)
            seen.append("failed")
            # It cleaned up after itself: nothing but the committed output is left.
            assert_whole(store, ["fox"], "p1", FIRST)
            continue
        manifest = store.read_manifest(["fox"], "p1")
        assert manifest is not None and manifest["run_id"] == "failing"
        if faulty.calls >= step:
            # It failed after the commit, deleting what it retired: a warning, no error.
            seen.append("committed, retiring failed")
            assert [im.data for im in store.read(["fox"], "p1")] == SECOND
            store.clean_up(now=LATER)
            assert_whole(store, ["fox"], "p1", SECOND)
            _first_write(store)
            continue
        seen.append("done")
        break
    assert seen.count("failed") >= 4 and seen[-1] == "done", seen
    assert "committed, retiring failed" in seen
    assert_whole(store, ["fox"], "p1", SECOND)


def test_a_failure_while_generating_keeps_the_committed_output(store: ImageStore) -> None:
    _first_write(store)

    def answers() -> Iterator[Any]:
        yield answer("an owl", [3], offset=50)
        raise RuntimeError("the server went away")

    from dagster_octoai.api.batch import ImageBatch

    with pytest.raises(RuntimeError, match="went away"):
        store.write(ImageBatch(answers()), asset_key=["fox"], partition_key="p1", run_id="x")
    assert_whole(store, ["fox"], "p1", FIRST)


def test_a_commit_whose_answer_was_lost_is_still_committed(store: ImageStore) -> None:
    _first_write(store)
    real = store.backend.put_if

    def put_if(*args: Any) -> str:
        real(*args)  # it lands...
        raise StorageError("cannot reach the S3 endpoint: connection dropped")  # ...unanswered

    lossy = ImageStore(_Wrapped(store.backend, put_if), prefix="gen")  # type: ignore[arg-type]
    report = lossy.write(
        [answer("an owl", [3], offset=50)], asset_key=["fox"], partition_key="p1", run_id="r"
    )
    assert report.write_id == store.read_manifest(["fox"], "p1")["write_id"]  # type: ignore[index]
    assert_whole(store, ["fox"], "p1", [picture(53)])


# ---- concurrent writers ----------------------------------------------------------------


@pytest.mark.parametrize("same", [False, True], ids=["different images", "same images"])
def test_concurrent_writers_in_processes_leave_one_whole_version(
    place: dict[str, Any], store: ImageStore, tmp_path: Path, same: bool
) -> None:
    _first_write(store)
    n = 3
    barrier = mp().Barrier(n)
    outs = [tmp_path / f"writer-{i}.json" for i in range(n)]
    codes = run_children(racing_write, [(place, i, same, barrier, str(outs[i])) for i in range(n)])
    assert codes == [0] * n
    results = [json.loads(out.read_text()) for out in outs]
    manifest = store.read_manifest(["fox"], "p1")
    assert manifest is not None
    winner = next(r for r in results if r["write_id"] == manifest["write_id"])
    expected = [picture(1 + winner["offset"]), picture(2 + winner["offset"])]
    assert_whole(store, ["fox"], "p1", expected)
    if same:
        # The writers that lost adopted the winner's version: one commit, one write id.
        assert {r["write_id"] for r in results} == {manifest["write_id"]}
    else:
        assert len({r["write_id"] for r in results}) == n
        assert len(manifest["supersedes"]) >= 2  # it replaced the first write and a racer


def test_concurrent_writers_in_threads_leave_one_whole_version(store: ImageStore) -> None:
    _first_write(store)
    n = 4
    barrier = threading.Barrier(n)
    reports: list[Any] = [None] * n

    def write(i: int) -> None:
        own = ImageStore(store.backend, prefix="gen", max_concurrency=2)
        original = own.backend.put_if
        met = threading.local()

        def put_if(*args: Any, **kwargs: Any) -> str:
            if not getattr(met, "done", False):
                met.done = True
                barrier.wait(timeout=60)
            return original(*args, **kwargs)

        own.backend = _Wrapped(store.backend, put_if)  # type: ignore[assignment]
        reports[i] = own.write(
            [answer("a fox", [1, 2], offset=10 * (i + 1))],
            asset_key=["fox"],
            partition_key="p1",
            run_id=f"t{i}",
        )

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    manifest = store.read_manifest(["fox"], "p1")
    assert manifest is not None
    (winner,) = [i for i in range(n) if reports[i].write_id == manifest["write_id"]]
    offset = 10 * (winner + 1)
    assert_whole(store, ["fox"], "p1", [picture(1 + offset), picture(2 + offset)])


class _Wrapped:
    """A backend with one method replaced (the others are the real one's)."""

    def __init__(self, inner: StorageBackend, put_if: Any) -> None:
        self._inner = inner
        self.put_if = put_if

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_read_overlapping_a_commit_reads_the_new_version_whole(store: ImageStore) -> None:
    _first_write(store)
    writer = ImageStore(store.backend, prefix="gen")
    real_get = store.backend.get
    calls = [0]

    def get(key: str) -> bytes:
        calls[0] += 1
        if calls[0] == 1:
            # While the reader fetches its first image, another run commits and retires it.
            writer.write(
                [answer("an owl", [3], offset=50)],
                asset_key=["fox"],
                partition_key="p1",
                run_id="w",
            )
        return real_get(key)

    reader = ImageStore(_Getter(store.backend, get), prefix="gen", max_concurrency=1)  # type: ignore[arg-type]
    assert [im.data for im in reader.read(["fox"], "p1")] == [picture(53)]


class _Getter:
    def __init__(self, inner: StorageBackend, get: Any) -> None:
        self._inner = inner
        self.get = get

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ---- keys that never collide -------------------------------------------------------------


def test_an_asset_partition_and_a_longer_asset_key_never_share_a_key(store: ImageStore) -> None:
    store.write([answer("shoes", [1])], asset_key=["products"], partition_key="shoes", run_id="a")
    store.write(
        [answer("boots", [2])], asset_key=["products", "shoes"], partition_key=None, run_id="b"
    )
    assert [im.data for im in store.read(["products"], "shoes")] == [picture(1)]
    assert [im.data for im in store.read(["products", "shoes"], None)] == [picture(2)]
    assert store.manifest_key(["products"], "shoes") != store.manifest_key(
        ["products", "shoes"], None
    )
    # Re-writing and cleaning up one never touches the other.
    store.write([answer("sandals", [3])], asset_key=["products"], partition_key="shoes", run_id="c")
    store.clean_up(now=LATER)
    assert [im.data for im in store.read(["products", "shoes"], None)] == [picture(2)]
    assert [im.data for im in store.read(["products"], "shoes")] == [picture(3)]


segments = st.text(alphabet=st.sampled_from("ab_-.=/~ é"), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    a=st.lists(segments, min_size=1, max_size=3),
    b=st.lists(segments, min_size=1, max_size=3),
    pa=st.one_of(st.none(), segments),
    pb=st.one_of(st.none(), segments),
)
def test_no_two_outputs_share_a_key_by_construction(
    a: list[str], b: list[str], pa: str | None, pb: str | None
) -> None:
    if (a, pa) == (b, pb):
        return
    ka, kb = output_key("gen", a, pa), output_key("gen", b, pb)
    # Neither output's manifest or objects can be under the other's keys.
    for mine, theirs in ((ka, kb), (kb, ka)):
        assert f"{mine}/manifest.json" != f"{theirs}/manifest.json"
        assert not f"{mine}/manifest.json".startswith(f"{theirs}/{OBJECTS_DIR}/")
        assert not f"{mine}/{OBJECTS_DIR}/".startswith(f"{theirs}/{OBJECTS_DIR}/")


@settings(max_examples=200, deadline=None)
@given(
    a=st.lists(segments, min_size=1, max_size=3), p=segments, more=st.lists(segments, max_size=2)
)
def test_a_partition_is_never_read_as_an_asset_key_segment(
    a: list[str], p: str, more: list[str]
) -> None:
    # The case version 1 mixed up: asset a + partition p against asset a/p (/...).
    partitioned = output_key("gen", a, p)
    for other in (
        output_key("gen", [*a, p, *more], None),
        output_key("gen", [*a, p], more[0] if more else None),
    ):
        assert partitioned != other
        assert not other.startswith(f"{partitioned}/{OBJECTS_DIR}/")
        assert not partitioned.startswith(f"{other}/{OBJECTS_DIR}/")


# ---- manifests: typed, versioned, checked ----------------------------------------------


def test_a_corrupt_manifest_is_named_on_read_and_does_not_block_a_fresh_write(
    store: ImageStore, caplog: pytest.LogCaptureFixture
) -> None:
    _first_write(store)
    key = store.manifest_key(["fox"], "p1")
    store.backend.put(key, b'{"schema_version": 2, "asset_key": ', "application/json", {})
    with pytest.raises(
        StorageError, match=r"manifest\.json is not a valid image manifest.*re-materialize"
    ):
        store.read(["fox"], "p1")
    assert store.find_existing(answer("a fox", [1, 2]).request, ["fox"], "p1") is None
    with caplog.at_level("WARNING", logger="dagster_octoai.storage"):
        store.write(
            [answer("an owl", [3], offset=50)],
            asset_key=["fox"],
            partition_key="p1",
            run_id="fresh",
        )
    assert "this write replaces it" in caplog.text
    assert [im.data for im in store.read(["fox"], "p1")] == [picture(53)]
    # The corrupt manifest's images are orphans now: the clean-up finds them.
    store.clean_up(now=LATER)
    assert_whole(store, ["fox"], "p1", [picture(53)])


def test_a_manifest_of_another_output_is_refused_on_read_and_write(store: ImageStore) -> None:
    _first_write(store)
    key = store.manifest_key(["fox"], "p1")
    manifest = json.loads(store.backend.get(key))
    manifest["asset_key"] = ["owl"]
    store.backend.put(key, json.dumps(manifest).encode(), "application/json", {})
    with pytest.raises(
        StorageError,
        match="is the manifest of asset 'owl' partition 'p1', not of asset 'fox' partition 'p1'",
    ):
        store.read(["fox"], "p1")
    with pytest.raises(StorageError, match="Nothing was read or written"):
        store.write([answer("x", [9])], asset_key=["fox"], partition_key="p1", run_id="r")
    with pytest.raises(StorageError, match="is the manifest of asset 'owl'"):
        store.preflight(["fox"], "p1")
    assert json.loads(store.backend.get(key))["asset_key"] == ["owl"]  # not written over


def test_version_1_outputs_are_read_in_place_and_retired_by_the_next_write(
    store: ImageStore,
) -> None:
    # What version 1 stored: images beside the manifest, the partition's segment bare.
    legacy = legacy_output_key("gen", ["fox"], "p1")
    assert legacy == "gen/fox/p1"
    records = []
    for i, seed in enumerate([1, 2]):
        key = f"{legacy}/{i:03d}-seed{seed}.jpg"
        store.backend.put(key, picture(seed), "image/jpeg", {})
        records.append(
            {"index": i, "seed": seed, "key": key, "uri": store.backend.uri(key),
             "bytes": len(picture(seed)), "sha256": hashlib.sha256(picture(seed)).hexdigest(),
             "content_type": "image/jpeg", "format": "jpeg", "width": 48, "height": 48,
             "converted_from": None, "removed_for_safety": False, "safety_score": None, "metadata": {}}
        )  # fmt: skip
    request = answer("a fox", [1, 2]).request
    v1 = {
        "schema_version": 1, "asset_key": ["fox"], "partition": "p1", "partition_dimensions": None,
        "run_id": "old", "created_at": "2024-01-01T00:00:00.000Z", "uri": store.backend.uri(f"{legacy}/"),
        "image_count": 2, "removed_count": 0, "total_bytes": sum(r["bytes"] for r in records),
        "results": [{"request": {"engine": "sd", "body": request.to_wire()}, "fingerprint": request.fingerprint(),
                     "response_id": None, "reused_from": None, "prediction_time_ms": 1.0,
                     "call_info": {"attempts": 1, "request_ids": [], "elapsed_s": 0.1, "response_id": None},
                     "images": records}],
    }  # fmt: skip
    store.backend.put(f"{legacy}/manifest.json", json.dumps(v1).encode(), "application/json", {})

    assert [im.data for im in store.read(["fox"], "p1")] == FIRST
    assert store.find_existing(request, ["fox"], "p1") is not None
    # Another output whose version-2 key is that old key is told apart, never mixed up.
    with pytest.raises(StorageError, match="is the manifest of asset 'fox' partition 'p1'"):
        store.read(["fox", "p1"], None)

    store.write(
        [answer("an owl", [3], offset=50)], asset_key=["fox"], partition_key="p1", run_id="new"
    )
    assert store.read_manifest(["fox"], "p1")["schema_version"] == 2  # type: ignore[index]
    assert_whole(store, ["fox"], "p1", [picture(53)])
    assert not [k for k in everything(store) if k.startswith(f"{legacy}/")]  # retired


# ---- clean-up ---------------------------------------------------------------------------


def test_clean_up_removes_orphans_and_never_what_may_still_commit(store: ImageStore) -> None:
    _first_write(store)
    base = store.output_key(["fox"], "p1")
    # A killed write's objects, a version-1 staging left-over and an old preflight probe.
    orphan = f"{base}/{OBJECTS_DIR}/20240101T000000Z-0123456789/000-seed1.jpg"
    staging = f"{base}/_staging/0123456789abcdef/000-seed1.jpg"
    probe = "gen/_preflight/0123.probe"
    for key in (orphan, staging, probe):
        store.backend.put(key, picture(1), "image/jpeg", {})
    committed = committed_keys(store, ["fox"], "p1")

    young = store.clean_up()  # just written: may belong to a write still running
    assert young.removed_keys == [] and len(young.kept_in_progress) == 1
    dry = store.clean_up(now=LATER, dry_run=True)
    assert sorted(dry.removed_keys) == sorted([orphan, staging, probe]) and dry.dry_run
    assert all(store.backend.get_or_none(k) is not None for k in (orphan, staging, probe))
    done = store.clean_up(now=LATER)
    assert sorted(done.removed_keys) == sorted([orphan, staging, probe])
    assert "removed 3 object(s)" in done.summary()
    assert all(store.backend.get_or_none(k) is None for k in (orphan, staging, probe))
    assert [im.data for im in store.read(["fox"], "p1")] == FIRST
    assert committed_keys(store, ["fox"], "p1") == committed
    with pytest.raises(ValueError, match="older_than"):
        store.clean_up(older_than=timedelta(minutes=5))


def test_clean_up_removes_a_retired_write_at_once_and_leaves_unreadable_outputs(
    store: ImageStore,
) -> None:
    _first_write(store)
    retired = committed_keys(store, ["fox"], "p1")

    class NoRetire(_Wrapped):
        def delete(self, keys: Any) -> None:
            raise StorageError("simulated outage while retiring")

    killed = ImageStore(NoRetire(store.backend, store.backend.put_if), prefix="gen")  # type: ignore[arg-type]
    killed.write(
        [answer("an owl", [3], offset=50)], asset_key=["fox"], partition_key="p1", run_id="r"
    )
    assert all(store.backend.get_or_none(k) is not None for k in retired)
    report = store.clean_up()  # no waiting: the committed manifest names the retired write
    assert sorted(report.removed_keys) == sorted(retired)
    assert_whole(store, ["fox"], "p1", [picture(53)])

    store.write([answer("a cat", [4])], asset_key=["cat"], partition_key=None, run_id="c")
    store.backend.put(store.manifest_key(["cat"], None), b"not json", "application/json", {})
    store.backend.put(
        f"gen/cat/{OBJECTS_DIR}/20240101T000000Z-aaaaaaaaaa/x.jpg", b"x", "image/jpeg", {}
    )
    report = store.clean_up(now=LATER)
    assert report.unreadable_manifests == [store.backend.uri(store.manifest_key(["cat"], None))]
    assert not [k for k in report.removed_keys if k.startswith("gen/cat/")]


def test_the_clean_up_command_line(
    place: dict[str, Any], store: ImageStore, capsys: pytest.CaptureFixture[str]
) -> None:
    from dagster_octoai.storage import clean

    _first_write(store)
    orphan = f"{store.output_key(['fox'], 'p1')}/{OBJECTS_DIR}/20240101T000000Z-0123456789/a.jpg"
    store.backend.put(orphan, picture(1), "image/jpeg", {})
    if "base_dir" in place:
        where = ["--base-dir", place["base_dir"]]
    else:
        where = [
            "--bucket",
            place["bucket"],
            "--endpoint-url",
            place["endpoint_url"],
            "--region",
            place["region"],
        ]
    env = (
        {}
        if "base_dir" in place
        else {
            "AWS_ACCESS_KEY_ID": place["access_key"],
            "AWS_SECRET_ACCESS_KEY": place["secret_key"],
        }
    )
    with pytest.MonkeyPatch.context() as mp_:
        for k, v in env.items():
            mp_.setenv(k, v)
        assert (
            clean.main(
                [
                    *where,
                    "--prefix",
                    "gen",
                    "--older-than-hours",
                    "1",
                    "--dry-run",
                    "--now",
                    LATER.isoformat(),
                ]
            )
            == 0
        )
        assert store.backend.get_or_none(orphan) is not None
        assert (
            clean.main(
                [*where, "--prefix", "gen", "--older-than-hours", "1", "--now", LATER.isoformat()]
            )
            == 0
        )
    out = capsys.readouterr().out
    assert "would remove 1 object(s)" in out and "removed 1 object(s)" in out
    assert store.backend.get_or_none(orphan) is None
    assert_whole(store, ["fox"], "p1", FIRST)
    if "secret_key" in place:
        assert place["secret_key"] not in out
