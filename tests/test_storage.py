"""ImageStore against a real SeaweedFS and a local directory: layout, bytes, metadata, manifests."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.api.models import (
    CallInfo,
    GeneratedImage,
    ImageGenerationRequest,
    ImageGenerationResponse,
)
from dagster_octoai.storage import (
    ImageStore,
    LocalBackend,
    ObjectNotFoundError,
    S3Backend,
    StorageBackend,
    StorageError,
)
from dagster_octoai.storage.layout import index_key, output_key, safe_segment
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by this module

# ---- helpers (also used by test_io_managers) --------------------------------------------


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (64, 64)) -> bytes:
    """A real small image whose pixels depend on the seed."""
    im = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    for x in range(0, size[0], 8):
        im.putpixel((x, (seed + x) % size[1]), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def make_result(
    prompt: str = "a red fox",
    seeds: list[int] | None = None,
    *,
    fmt: str = "JPEG",
    removed: frozenset[int] = frozenset(),
    engine: str = "sd",
    response_id: str | None = None,
    explicit: bool = True,
    **fields: Any,
) -> ImageGenerationResponse:
    """An answer built from real images, carrying its request, as the client returns it."""
    seeds = seeds if seeds is not None else [7]
    request = ImageGenerationRequest(
        prompt=prompt,
        engine=engine,
        num_images=len(seeds) if len(seeds) > 1 else None,
        seed=(list(seeds) if len(seeds) > 1 else seeds[0]) if explicit else None,
        **fields,
    )
    images = [
        GeneratedImage(
            image_b64=None if s in removed else base64.b64encode(image_bytes(s, fmt)).decode(),
            seed=s,
            removed_for_safety=s in removed,
            safety_score=0.9 if s in removed else 0.01,
        )
        for s in seeds
    ]
    return ImageGenerationResponse(
        images=images,
        prediction_time_ms=123.5,
        request=request,
        response_id=response_id,
        call_info=CallInfo(
            attempts=2, request_ids=("req-1", "req-2"), elapsed_s=1.5, response_id=response_id
        ),
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ImageStore:
    """The same store tests run on SeaweedFS and on a local directory."""
    if request.param == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        bucket: str = request.getfixturevalue("s3_bucket")
        backend: StorageBackend = S3Backend(server.client(), bucket)
    else:
        backend = LocalBackend(tmp_path / "images")
    return ImageStore(backend, prefix="gen", max_concurrency=4)


def indexed(store: ImageStore) -> ImageStore:
    """The same backend and prefix, with the fingerprint index on."""
    return ImageStore(store.backend, prefix="gen", max_concurrency=4, fingerprint_index=True)


def s3_client(store: ImageStore) -> Any:
    assert isinstance(store.backend, S3Backend)
    return store.backend.client


def image_keys(store: ImageStore, asset_key: list[str], partition: Any = None) -> list[str]:
    """The object keys the committed manifest of an output lists, in index order."""
    manifest = store.read_manifest(asset_key, partition)
    assert manifest is not None
    return [im["key"] for r in manifest["results"] for im in r["images"] if im["key"]]


def stored_keys(store: ImageStore) -> list[str]:
    """Every object under the store's prefix (lock files of the local backend aside)."""
    return sorted(o.key for o in store.backend.list("gen/"))


def objects_of(base: str, manifest: dict[str, Any], *names: str) -> list[str]:
    """``{base}/_objects/{the manifest's write id}/{name}`` for each name."""
    return [f"{base}/_objects/{manifest['write_id']}/{name}" for name in names]


# ---- layout ----------------------------------------------------------------------------


def test_safe_segment_keeps_plain_names_and_escapes_the_rest() -> None:
    assert safe_segment("2024-01-01") == "2024-01-01"
    assert safe_segment("fox_v2.1") == "fox_v2.1"
    for hostile in [
        "..",
        ".",
        "../../etc/passwd",
        "a/b",
        "a\\b",
        ".hidden",
        "x\x00y",
        "x\ny",
        "_index",
        "_staging",
        "manifest.json",
        "~",
        "é",
        "",
        "a" * 300,
        "k=v",
    ]:
        seg = safe_segment(hostile)
        assert "/" not in seg and "\\" not in seg, hostile
        assert seg not in ("", ".", ".."), hostile
        assert not seg.startswith("."), hostile
        assert all(32 < ord(c) < 127 for c in seg), hostile
        assert "~" in seg and len(seg) <= 65, hostile


def test_distinct_values_never_share_a_segment() -> None:
    values = ["a/b", "a_b", "a\\b", "a b", "a:b", "a_b~0", "A/B", "a" * 300, "a" * 301]
    assert len({safe_segment(v) for v in values}) == len(values)


def test_output_key_layout_and_multi_partitions() -> None:
    class MultiKey(str):
        keys_by_dimension = {"region": "eu/west", "date": "2024-01-01"}

    assert output_key("gen", ["fox", "raw"], None) == "gen/fox/raw"
    assert output_key("", ["fox"], "2024-01-01") == "fox/partition=2024-01-01"
    multi = output_key("gen", ["fox"], MultiKey("2024-01-01|eu/west"))
    assert multi == f"gen/fox/date=2024-01-01/region={safe_segment('eu/west')}"
    assert multi.startswith("gen/fox/") and multi.count("/") == 3
    with pytest.raises(ValueError, match="prefix"):
        output_key("gen/../x", ["fox"], None)
    with pytest.raises(ValueError, match="asset_key"):
        output_key("gen", [], None)


# ---- writes ----------------------------------------------------------------------------


def test_write_stores_exact_bytes_metadata_and_manifest(store: ImageStore) -> None:
    jpeg = make_result("a red fox", [11, 12], steps=20, cfg_scale=7.5, sampler="K_EULER")
    png = make_result("a blue owl", [5], fmt="PNG", response_id="job-1")
    report = store.write([jpeg, png], asset_key=["fox"], partition_key="p1", run_id="run-1")

    manifest = store.read_manifest(["fox"], "p1")
    assert manifest is not None and manifest["write_id"] == report.write_id
    base = "gen/fox/partition=p1"
    keys = objects_of(base, manifest, "000-seed11.jpg", "001-seed12.jpg", "002-seed5.png")
    assert report.image_uris == [store.backend.uri(k) for k in keys]
    assert report.uri == store.backend.uri(f"{base}/")
    assert report.manifest_uri == store.backend.uri(f"{base}/manifest.json")
    assert report.seeds == [11, 12, 5]
    expected = [image_bytes(11), image_bytes(12), image_bytes(5, "PNG")]
    assert report.total_bytes == sum(len(b) for b in expected)
    for key, data in zip(keys, expected, strict=True):
        assert store.backend.get(key) == data
    assert report.thumbnail is not None and report.thumbnail.startswith("data:image/jpeg;base64,")
    assert len(report.thumbnail) < 20_000

    assert manifest["schema_version"] == 2
    assert manifest["supersedes"] == []
    assert manifest["asset_key"] == ["fox"]
    assert manifest["partition"] == "p1"
    assert manifest["partition_dimensions"] is None
    assert manifest["run_id"] == "run-1"
    assert manifest["image_count"] == 3 and manifest["removed_count"] == 0
    assert manifest["total_bytes"] == report.total_bytes
    first = manifest["results"][0]
    assert first["request"] == {
        "engine": "sd",
        "body": {
            "prompt": "a red fox",
            "cfg_scale": 7.5,
            "steps": 20,
            "num_images": 2,
            "seed": [11, 12],
            "sampler": "K_EULER",
        },
    }
    assert first["fingerprint"] == jpeg.request.fingerprint()
    assert first["prediction_time_ms"] == 123.5
    assert first["call_info"] == {
        "attempts": 2,
        "request_ids": ["req-1", "req-2"],
        "elapsed_s": 1.5,
        "response_id": None,
    }
    metadata = {
        "seed": "11",
        "engine": "sd",
        "sampler": "K_EULER",
        "steps": "20",
        "cfg-scale": "7.5",
        "width": "64",
        "height": "64",
        "request-fingerprint": jpeg.request.fingerprint(),
        "run-id": "run-1",
        "asset-key": "fox",
        "partition": "p1",
        "index": "0",
    }
    assert first["images"][0] == {
        "index": 0,
        "seed": 11,
        "key": keys[0],
        "uri": store.backend.uri(keys[0]),
        "bytes": len(expected[0]),
        "sha256": sha(expected[0]),
        "content_type": "image/jpeg",
        "format": "jpeg",
        "width": 64,
        "height": 64,
        "converted_from": None,
        "removed_for_safety": False,
        "safety_score": 0.01,
        "metadata": metadata,
    }
    owl = manifest["results"][1]
    assert owl["response_id"] == "job-1"
    assert owl["images"][0]["content_type"] == "image/png"
    assert owl["images"][0]["metadata"]["response-id"] == "job-1"

    if isinstance(store.backend, S3Backend):
        head = store.backend.head(keys[0])
        assert head["ContentType"] == "image/jpeg"
        assert head["Metadata"] == metadata
        assert store.backend.head(keys[2])["ContentType"] == "image/png"
        assert store.backend.head(f"{base}/manifest.json")["ContentType"] == "application/json"
    assert stored_keys(store) == sorted([*keys, f"{base}/manifest.json"])  # no index by default


def test_manifest_alone_regenerates_the_request(store: ImageStore) -> None:
    init = image_bytes(3, "PNG", (512, 512))
    result = make_result("a fox, (detailed:1.2)", [42], engine="sd", init_image=init, strength=0.5)
    store.write([result], asset_key=["fox"], partition_key=None, run_id="r")
    manifest = store.read_manifest(["fox"], None)
    assert manifest is not None
    record = manifest["results"][0]["request"]
    rebuilt = ImageGenerationRequest.from_wire(record["body"], record["engine"])
    assert rebuilt == result.request
    assert rebuilt.fingerprint() == result.request.fingerprint()
    assert base64.b64decode(record["body"]["init_image"]) == init


def test_removed_images_are_in_the_manifest_without_objects(store: ImageStore) -> None:
    result = make_result("x", [1, 2, 3], removed=frozenset({2}))
    report = store.write([result], asset_key=["a"], partition_key=None, run_id="r")
    assert report.removed_count == 1
    assert report.seeds == [1, 3]
    manifest = store.read_manifest(["a"], None)
    assert manifest is not None
    blocked = manifest["results"][0]["images"][1]
    assert blocked["removed_for_safety"] is True
    assert blocked["key"] is None and blocked["bytes"] == 0 and blocked["safety_score"] == 0.9
    assert not any("seed2" in k for k in stored_keys(store))
    assert [im.seed for im in store.read(["a"], None)] == [1, 3]
    assert [im.index for im in store.read(["a"], None)] == [0, 2]


def test_convert_to_png(store: ImageStore) -> None:
    store.convert_to = "png"
    report = store.write([make_result("x", [4])], asset_key=["a"], partition_key=None, run_id="r")
    manifest = store.read_manifest(["a"], None)
    assert manifest is not None
    (key,) = objects_of("gen/a", manifest, "000-seed4.png")
    assert report.image_uris == [store.backend.uri(key)]
    data = store.backend.get(key)
    assert data.startswith(b"\x89PNG")
    image = manifest["results"][0]["images"][0]
    assert image["converted_from"] == "jpeg" and image["content_type"] == "image/png"


def test_load_back(store: ImageStore) -> None:
    result = make_result("a red fox", [11, 12], steps=20)
    store.write([result], asset_key=["fox"], partition_key="p1", run_id="run-1")
    images = store.read(["fox"], "p1")
    assert [im.data for im in images] == [image_bytes(11), image_bytes(12)]
    assert [im.seed for im in images] == [11, 12]
    assert images[0].request == result.request
    assert images[0].partition_key == "p1"
    assert images[0].uri == store.backend.uri(image_keys(store, ["fox"], "p1")[0])
    assert "/fox/partition=p1/_objects/" in images[0].uri
    assert images[0].to_pil().size == (64, 64)
    assert images[0].metadata["seed"] == "11"
    assert images[0].metadata["run_id"] == "run-1"
    assert [im.index for im in images] == [0, 1]
    # The stored bytes as they are: no base64 to encode and decode again.
    assert all(isinstance(im, GeneratedImage) and im.image_b64 is None for im in images)
    with pytest.raises(ObjectNotFoundError, match="materialized"):
        store.read(["fox"], "p2")


def test_read_detects_an_image_replaced_behind_its_back(store: ImageStore) -> None:
    store.write([make_result("x", [1])], asset_key=["a"], partition_key=None, run_id="r")
    (key,) = image_keys(store, ["a"])
    store.backend.put(key, image_bytes(99), "image/jpeg", {})
    with pytest.raises(StorageError, match=r"sha256 in .* changed outside this IO manager"):
        store.read(["a"], None)
    store.backend.delete([key])
    with pytest.raises(StorageError, match=r"listed in .* but missing: it was deleted outside"):
        store.read(["a"], None)


# ---- re-runs and failures ------------------------------------------------------------


def test_rerun_replaces_cleanly(store: ImageStore) -> None:
    store.write([make_result("x", [1, 2, 3])], asset_key=["a"], partition_key=None, run_id="r1")
    first = store.read_manifest(["a"], None)
    store.write([make_result("y", [1, 9])], asset_key=["a"], partition_key=None, run_id="r2")
    manifest = store.read_manifest(["a"], None)
    assert manifest is not None and first is not None and manifest["run_id"] == "r2"
    assert manifest["supersedes"] == [first["write_id"]]
    keys = objects_of("gen/a", manifest, "000-seed1.jpg", "001-seed9.jpg")
    assert image_keys(store, ["a"]) == keys
    # The new write owns its objects (the unchanged image copied server-side, never
    # written over the old key); the old write's objects are retired after the commit.
    assert stored_keys(store) == sorted([*keys, "gen/a/manifest.json"])
    assert store.backend.get(keys[1]) == image_bytes(9)
    if isinstance(store.backend, S3Backend):
        assert store.backend.head(keys[0])["Metadata"]["run-id"] == "r2"
        assert (
            store.backend.head(keys[0])["Metadata"]["request-fingerprint"]
            == make_result("y", [1, 9]).request.fingerprint()
        )
    assert [im.data for im in store.read(["a"], None)] == [image_bytes(1), image_bytes(9)]


class RecordingBackend(StorageBackend):
    """Wraps a real backend: records puts and copies; the ``fail_on_put``-th put of an
    image or manifest raises (index entries are written alongside, in no fixed order)."""

    def __init__(self, inner: StorageBackend, fail_on_put: int | None = None) -> None:
        self.inner = inner
        self.fail_on_put = fail_on_put
        self.puts: list[str] = []
        self.copies: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self.lock:
            self.puts.append(key)
            counted = [k for k in self.puts if "/_index/" not in k]
            fail = "/_index/" not in key and len(counted) == self.fail_on_put
        if fail:
            raise StorageError(f"simulated outage writing {key}")

    def uri(self, key: str) -> str:
        return self.inner.uri(key)

    def key_for_uri(self, uri: str) -> str | None:
        return self.inner.key_for_uri(uri)

    def put(self, key: str, data: bytes, content_type: str, metadata: Any) -> None:
        self._count(key)
        self.inner.put(key, data, content_type, metadata)

    def put_if(
        self, key: str, data: bytes, content_type: str, metadata: Any, expected: str | None
    ) -> str:
        self._count(key)
        return self.inner.put_if(key, data, content_type, metadata, expected)

    def copy(self, source_key: str, key: str, content_type: str, metadata: Any) -> None:
        with self.lock:
            self.copies.append((source_key, key))
        self.inner.copy(source_key, key, content_type, metadata)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_versioned(self, key: str) -> Any:
        return self.inner.get_versioned(key)

    def delete(self, keys: Any) -> None:
        self.inner.delete(keys)

    def delete_if(self, key: str, expected: str) -> bool:
        return self.inner.delete_if(key, expected)

    def list(self, prefix: str) -> Any:
        return self.inner.list(prefix)

    def check(self) -> None:
        self.inner.check()

    def check_key(self, key: str) -> None:
        self.inner.check_key(key)


@pytest.mark.parametrize("fail_on_put", [2, 4])
def test_failure_mid_write_keeps_the_previous_manifest_valid(
    store: ImageStore, fail_on_put: int
) -> None:
    first = make_result("x", [1, 2, 3])
    store.write([first], asset_key=["a"], partition_key=None, run_id="r1")
    before = store.read_manifest(["a"], None)

    # Same seeds, other prompt: every key collides with the old one, with other bytes.
    second = ImageGenerationResponse(
        images=[
            GeneratedImage(image_b64=base64.b64encode(image_bytes(s + 100)).decode(), seed=s)
            for s in (1, 2, 3, 4)
        ],
        request=make_result("y", [1, 2, 3, 4], fmt="JPEG").request,
    )
    failing = ImageStore(
        RecordingBackend(store.backend, fail_on_put), prefix="gen", max_concurrency=2
    )
    with pytest.raises(StorageError, match="simulated outage"):
        failing.write([second], asset_key=["a"], partition_key=None, run_id="r2")

    assert store.read_manifest(["a"], None) == before
    loaded = store.read(["a"], None)  # checks every sha256 against the manifest
    assert [im.data for im in loaded] == [image_bytes(1), image_bytes(2), image_bytes(3)]
    # What the failed write stored is gone; what the committed manifest lists is all there.
    assert stored_keys(store) == sorted([*image_keys(store, ["a"]), "gen/a/manifest.json"])


def test_failure_while_generating_keeps_the_previous_output(store: ImageStore) -> None:
    store.write([make_result("x", [1, 2])], asset_key=["a"], partition_key=None, run_id="r1")

    def results() -> Iterator[ImageGenerationResponse]:
        yield make_result("y", [1])
        raise RuntimeError("the API went away")

    with pytest.raises(RuntimeError, match="went away"):
        store.write(ImageBatch(results()), asset_key=["a"], partition_key=None, run_id="r2")
    manifest = store.read_manifest(["a"], None)
    assert manifest is not None and manifest["run_id"] == "r1"
    assert [im.data for im in store.read(["a"], None)] == [image_bytes(1), image_bytes(2)]


# ---- streaming ------------------------------------------------------------------------


def test_lazy_batch_is_streamed_with_bounded_memory(store: ImageStore) -> None:
    count, limit = 60, 3
    yielded = 0
    stored = 0
    ahead_max = 0
    lock = threading.Lock()

    class Watching(RecordingBackend):
        def put(self, key: str, data: bytes, content_type: str, metadata: Any) -> None:
            nonlocal stored
            super().put(key, data, content_type, metadata)
            with lock:
                stored += 1

    def results() -> Iterator[ImageGenerationResponse]:
        nonlocal yielded, ahead_max
        for seed in range(count):
            with lock:
                # Images produced but not yet stored: what the writer holds in memory.
                ahead_max = max(ahead_max, yielded - stored)
            yielded += 1
            yield make_result(f"frame {seed}", [seed])

    streaming = ImageStore(Watching(store.backend), prefix="gen", max_concurrency=limit)
    report = streaming.write(
        ImageBatch(results(), expected_images=count),
        asset_key=["frames"],
        partition_key=None,
        run_id="r",
    )
    assert report.image_count == count
    assert report.seeds == list(range(count))
    assert 1 <= ahead_max <= limit + 1
    manifest = store.read_manifest(["frames"], None)
    assert manifest is not None and manifest["image_count"] == count
    (last,) = objects_of("gen/frames", manifest, f"{count - 1:03d}-seed{count - 1}.jpg")
    assert store.backend.get(last) == image_bytes(count - 1)


# ---- idempotent generation ------------------------------------------------------------


def test_find_existing_and_reuse(store: ImageStore) -> None:
    store = indexed(store)
    original = make_result("a red fox", [11, 12], steps=20, response_id="job-9")
    store.write([original], asset_key=["fox"], partition_key="p1", run_id="r1")

    same = ImageGenerationRequest.build(original.request)
    found = store.find_existing(same, ["fox"], "p1")
    assert found is not None
    assert found.reused_from == store.backend.uri("gen/fox/partition=p1/manifest.json")
    assert [im.data for im in found.images] == [image_bytes(11), image_bytes(12)]
    assert found.response_id == "job-9"
    assert found.request == same and all(im.request == same for im in found.images)
    assert all(im.image_b64 is None for im in found.images)  # bytes kept, never base64
    # Through the fingerprint index, from another asset.
    via_index = store.find_existing(same)
    assert via_index is not None and via_index.reused_from == found.reused_from

    assert store.find_existing(ImageGenerationRequest.build(same, steps=21)) is None
    random_seed = make_result("a red fox", [11], explicit=False).request
    assert store.find_existing(random_seed) is None

    # Storing the reused result, in the same output or another: server-side copies into
    # the new write's own keys, no upload of the bytes.
    old_keys = image_keys(store, ["fox"], "p1")
    counting = RecordingBackend(store.backend)
    reuse_store = ImageStore(counting, prefix="gen", fingerprint_index=True)
    report = reuse_store.write([found], asset_key=["fox"], partition_key="p1", run_id="r2")
    new_keys = image_keys(store, ["fox"], "p1")
    assert sorted(counting.copies) == sorted(zip(old_keys, new_keys, strict=True))
    assert counting.puts == [
        "gen/fox/partition=p1/manifest.json",
        index_key("gen", same.fingerprint()),
    ]
    assert report.reused_count == 2
    counting.puts.clear()
    counting.copies.clear()
    found = store.find_existing(same, ["fox"], "p1")
    assert found is not None
    report = reuse_store.write([found], asset_key=["fox_copy"], partition_key=None, run_id="r3")
    copies = image_keys(store, ["fox_copy"])
    assert sorted(counting.copies) == sorted(zip(new_keys, copies, strict=True))
    assert counting.puts == ["gen/fox_copy/manifest.json", index_key("gen", same.fingerprint())]
    assert store.backend.get(copies[1]) == image_bytes(12)
    manifest = store.read_manifest(["fox_copy"], None)
    assert manifest is not None
    assert manifest["results"][0]["reused_from"] == found.reused_from
    if isinstance(store.backend, S3Backend):
        meta = store.backend.head(copies[1])["Metadata"]
        assert meta["asset-key"] == "fox_copy" and meta["run-id"] == "r3"
        assert "partition" not in meta


def test_find_existing_ignores_a_stale_index(store: ImageStore) -> None:
    store = indexed(store)
    result = make_result("x", [5])
    store.write([result], asset_key=["a"], partition_key=None, run_id="r1")
    store.write([make_result("y", [6])], asset_key=["a"], partition_key=None, run_id="r2")
    # The index still points at a/manifest.json, which no longer holds that request.
    assert store.backend.get_or_none(index_key("gen", result.request.fingerprint())) is not None
    assert store.find_existing(result.request) is None


def test_index_entries_written_before_the_manifest_never_answer_wrongly(
    store: ImageStore,
) -> None:
    # Entries of fresh results go out while the batch is stored, before the manifest.
    store = indexed(store)
    kept = make_result("kept", [1])
    store.write([kept], asset_key=["a"], partition_key=None, run_id="r1")
    lost = make_result("lost", [2, 3])
    # The third image-or-manifest put is the manifest: the images are stored, the
    # manifest is not, and the entry of "lost" may already point at b/manifest.json.
    failing = ImageStore(
        RecordingBackend(store.backend, fail_on_put=3), prefix="gen", fingerprint_index=True
    )
    with pytest.raises(StorageError, match=r"simulated outage writing gen/b/manifest\.json"):
        failing.write([lost], asset_key=["b"], partition_key=None, run_id="r2")
    assert not [k for k in stored_keys(store) if k.startswith("gen/b/")]  # cleaned up

    raw = store.backend.get_or_none(index_key("gen", lost.request.fingerprint()))
    if raw is not None:
        assert json.loads(raw)["manifest_key"] == "gen/b/manifest.json"
    assert store.read_manifest(["b"], None) is None
    assert store.find_existing(lost.request) is None  # a miss, never a wrong answer
    found = store.find_existing(kept.request)
    assert found is not None and found.images[0].data == image_bytes(1)


def test_without_the_index_nothing_is_indexed_or_looked_up(store: ImageStore) -> None:
    result = make_result("owl", [8])
    counting = RecordingBackend(store.backend)
    plain = ImageStore(counting, prefix="gen")
    plain.write([result], asset_key=["owl"], partition_key=None, run_id="r1")
    assert counting.puts == [*image_keys(store, ["owl"]), "gen/owl/manifest.json"]
    assert plain.find_existing(result.request, ["owl"], None) is not None  # its manifest
    # An entry another store wrote is not followed either.
    indexed(store).write([result], asset_key=["elsewhere"], partition_key=None, run_id="r2")
    assert store.backend.get_or_none(index_key("gen", result.request.fingerprint()))
    assert plain.find_existing(result.request) is None
    assert indexed(store).find_existing(result.request) is not None


class _IndexOutage(RecordingBackend):
    def put(self, key: str, data: bytes, content_type: str, metadata: Any) -> None:
        if "/_index/" in key:
            raise StorageError(f"simulated outage writing {key}")
        super().put(key, data, content_type, metadata)


def test_an_index_outage_costs_only_the_index(
    store: ImageStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = indexed(store)
    result = make_result("fox", [4, 5])
    outage = ImageStore(_IndexOutage(store.backend), prefix="gen", fingerprint_index=True)
    with caplog.at_level("WARNING", logger="dagster_octoai.storage"):
        report = outage.write([result], asset_key=["c"], partition_key=None, run_id="r1")
    assert report.seeds == [4, 5]
    assert [im.data for im in store.read(["c"], None)] == [image_bytes(4), image_bytes(5)]
    assert "could not write the fingerprint index for" in caplog.text
    assert store.find_existing(result.request, ["c"], None) is not None  # its own manifest
    assert store.find_existing(result.request) is None  # no index entry to follow


# ---- S3 errors -----------------------------------------------------------------------


def test_bad_credentials_give_a_clear_error(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    backend = S3Backend(seaweedfs.client(aws_secret_access_key="wrong-secret"), s3_bucket)
    store = ImageStore(backend, prefix="gen")
    with pytest.raises(StorageError, match="refused the credentials") as info:
        store.write([make_result("x", [1])], asset_key=["a"], partition_key=None, run_id="r")
    assert "wrong-secret" not in str(info.value)
    assert info.value.status_code == 403
    with pytest.raises(StorageError, match="refused the credentials"):
        backend.check()


def test_missing_bucket_gives_a_clear_error(seaweedfs: SeaweedFS) -> None:
    backend = S3Backend(seaweedfs.client(), "no-such-bucket-here")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        ImageStore(backend, prefix="gen").write(
            [make_result("x", [1])], asset_key=["a"], partition_key=None, run_id="r"
        )
    with pytest.raises(StorageError, match="does not exist"):
        backend.check()


def test_retries_are_botocores_alone(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    # The client's retries config is the one retry loop: no second loop on top of it.
    backend = S3Backend.from_config(
        s3_bucket,
        endpoint_url=seaweedfs.endpoint_url,
        region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
        addressing_style="path",
        retry_mode="standard",
        max_attempts=3,
    )
    retries = backend.client.meta.config.retries
    assert retries == {"mode": "standard", "total_max_attempts": 3}
    from botocore.exceptions import ClientError

    calls: list[int] = []

    def slow_down() -> str:
        # What botocore raises once its own attempts are spent.
        calls.append(1)
        raise ClientError(
            {"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
             "ResponseMetadata": {"HTTPStatusCode": 503}},
            "PutObject",
        )  # fmt: skip

    with pytest.raises(StorageError, match="SlowDown") as info:
        backend._call("put", "k", slow_down)
    assert len(calls) == 1
    assert info.value.status_code == 503


def test_local_backend_refuses_keys_outside_base_dir(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "base")
    with pytest.raises(StorageError, match="outside base_dir"):
        backend.put("../escape.jpg", b"x", "image/jpeg", {})
    assert not (tmp_path / "escape.jpg").exists()


def test_manifest_json_is_readable_by_plain_json(store: ImageStore) -> None:
    store.write([make_result("x", [1])], asset_key=["a"], partition_key=None, run_id="r")
    assert json.loads(store.backend.get("gen/a/manifest.json"))["schema_version"] == 2


def test_key_injection_through_asset_key_partition_and_prompt(store: ImageStore) -> None:
    prompt = "../../etc/passwd\n\x00 ünïcode /\\ %2e%2e"
    partition = "../../../outside/é\r\n"
    report = store.write(
        [make_result(prompt, [8])],
        asset_key=["..", "a/b", ".git"],
        partition_key=partition,
        run_id="../run\n",
    )
    asset = "/".join(safe_segment(p) for p in ["..", "a/b", ".git"])
    base = f"gen/{asset}/partition={safe_segment(partition)}"
    manifest = store.read_manifest(["..", "a/b", ".git"], partition)
    assert manifest is not None
    (key,) = objects_of(base, manifest, "000-seed8.jpg")
    assert report.image_uris == [store.backend.uri(key)]
    assert store.backend.get(key) == image_bytes(8)
    assert manifest["partition"] == partition
    assert manifest["results"][0]["request"]["body"]["prompt"] == prompt
    metadata = manifest["results"][0]["images"][0]["metadata"]
    assert metadata["partition"] == "../../../outside/%C3%A9%0D%0A"
    assert metadata["run-id"] == "../run%0A"
    assert metadata["asset-key"] == "../a/b/.git"
    assert all(v.isascii() and v.isprintable() for v in metadata.values())
    if isinstance(store.backend, S3Backend):
        assert store.backend.head(key)["Metadata"] == metadata
    else:
        assert isinstance(store.backend, LocalBackend)
        for path in store.backend.base_dir.rglob("*"):
            assert store.backend.base_dir in path.resolve().parents
