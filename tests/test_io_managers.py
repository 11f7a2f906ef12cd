"""The image IO managers through real Dagster runs, against SeaweedFS and a local directory."""

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster import AssetExecutionContext
from test_storage import image_bytes, make_result, sha

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.api.models import (
    GeneratedImage,
    ImageGenerationRequest,
    ImageGenerationResponse,
)
from dagster_octoai.io_managers import LocalImageIOManager, S3ImageIOManager
from dagster_octoai.storage import S3Backend, StorageError, safe_segment
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by this module


def s3_io(server: SeaweedFS, bucket: str, **overrides: Any) -> S3ImageIOManager:
    settings: dict[str, Any] = {
        "bucket": bucket,
        "prefix": "octoai",
        "endpoint_url": server.endpoint_url,
        "region_name": server.region,
        "aws_access_key_id": server.access_key,
        "aws_secret_access_key": server.secret_key,
        "addressing_style": "path",
        "max_concurrency": 4,
    }
    settings.update(overrides)
    return S3ImageIOManager(**settings)


@pytest.fixture(params=["s3", "local"])
def io_manager(
    request: pytest.FixtureRequest, tmp_path: Path
) -> S3ImageIOManager | LocalImageIOManager:
    if request.param == "s3":
        return s3_io(request.getfixturevalue("seaweedfs"), request.getfixturevalue("s3_bucket"))
    return LocalImageIOManager(base_dir=str(tmp_path / "images"), prefix="octoai")


def output_metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    [event] = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(asset.split("/"))
    ]
    mat = event.materialization
    return {k: v.value for k, v in mat.metadata.items()}


def test_unpartitioned_asset_round_trip(io_manager: Any) -> None:
    @dg.asset
    def foxes() -> ImageBatch:
        return ImageBatch([make_result("a red fox", [11, 12], steps=20)])

    loaded: list[list[GeneratedImage]] = []

    @dg.asset
    def fox_sizes(foxes: list[GeneratedImage]) -> None:
        loaded.append(foxes)

    result = dg.materialize([foxes, fox_sizes], resources={"io_manager": io_manager})
    assert result.success
    store = io_manager.store
    meta = output_metadata(result, "foxes")
    manifest = store.read_manifest(["foxes"], None)
    write = f"octoai/foxes/_objects/{manifest['write_id']}"
    keys = [f"{write}/000-seed11.jpg", f"{write}/001-seed12.jpg"]
    assert meta["dagster/uri"] == store.backend.uri("octoai/foxes/")
    assert meta["manifest_uri"] == store.backend.uri("octoai/foxes/manifest.json")
    assert meta["image_uris"] == [store.backend.uri(k) for k in keys]
    assert meta["seeds"] == [11, 12]
    assert meta["images"] == 2 and meta["removed_for_safety"] == 0
    assert meta["total_bytes"] == len(image_bytes(11)) + len(image_bytes(12))
    assert meta["reused"] == 0
    assert "data:image/jpeg;base64," in meta["thumbnail"]
    assert len(meta["thumbnail"]) < 20_000
    # One key per fact: no second name for the URI, the counts or the thumbnail.
    assert not {"uri", "image_count", "removed_count", "reused_count", "preview"} & set(meta)

    [images] = loaded
    assert [im.data for im in images] == [image_bytes(11), image_bytes(12)]
    assert images[0].request == ImageGenerationRequest(
        prompt="a red fox", engine="sd", num_images=2, seed=[11, 12], steps=20
    )
    assert images[0].partition_key is None
    assert manifest["run_id"] == result.run_id
    assert manifest["results"][0]["images"][1]["metadata"]["run-id"] == result.run_id
    if isinstance(store.backend, S3Backend):
        head = store.backend.head(keys[1])
        assert head["ContentType"] == "image/jpeg"
        assert head["Metadata"] == {
            "seed": "12",
            "engine": "sd",
            "steps": "20",
            "width": "64",
            "height": "64",
            "request-fingerprint": images[0].request.fingerprint(),
            "run-id": result.run_id,
            "asset-key": "foxes",
            "index": "1",
        }


HOSTILE = ["../../escape", "a/b", "..", ".hidden", "normal-2024-01-01"]


def test_static_partitions_keys_are_sanitised_and_load_as_dict(io_manager: Any) -> None:
    parts = dg.StaticPartitionsDefinition(HOSTILE)

    @dg.asset(partitions_def=parts)
    def shots(context: AssetExecutionContext) -> ImageBatch:
        seed = HOSTILE.index(context.partition_key) + 1
        return ImageBatch([make_result(f"shot {context.partition_key}", [seed])])

    got: list[dict[str, list[GeneratedImage]]] = []

    @dg.asset
    def all_shots(shots: dict[str, list[GeneratedImage]]) -> None:
        got.append(shots)

    resources = {"io_manager": io_manager}
    for key in HOSTILE:
        result = dg.materialize([shots], partition_key=key, resources=resources)
        meta = output_metadata(result, "shots")
        base = f"octoai/shots/partition={safe_segment(key)}/"
        assert meta["dagster/uri"] == io_manager.store.backend.uri(base)
        seed = HOSTILE.index(key) + 1
        write_id = io_manager.store.read_manifest(["shots"], key)["write_id"]
        assert meta["image_uris"] == [
            io_manager.store.backend.uri(f"{base}_objects/{write_id}/000-seed{seed}.jpg")
        ]
    assert safe_segment("normal-2024-01-01") == "normal-2024-01-01"

    dg.materialize([shots, all_shots], selection=[all_shots], resources=resources)
    [by_partition] = got
    assert sorted(by_partition) == sorted(HOSTILE)
    for key, images in by_partition.items():
        seed = HOSTILE.index(key) + 1
        assert [im.data for im in images] == [image_bytes(seed)]
        assert images[0].partition_key == key

    store = io_manager.store
    if isinstance(store.backend, S3Backend):
        listed = store.backend.client.list_objects_v2(Bucket=store.backend.bucket)["Contents"]
        all_keys = [o["Key"] for o in listed]
    else:
        root = store.backend.base_dir
        all_keys = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        assert not any(p.name == "escape" for p in root.parent.rglob("*"))
    for key in all_keys:
        assert key.startswith("octoai/"), key
        assert ".." not in key.split("/") and "." not in key.split("/"), key
        assert not any(s.startswith(".") for s in key.split("/")), key


def test_multi_partitions_layout_and_single_partition_load(io_manager: Any) -> None:
    parts = dg.MultiPartitionsDefinition(
        {
            "date": dg.StaticPartitionsDefinition(["2024-01-01", "2024-01-02"]),
            "color": dg.StaticPartitionsDefinition(["red", "blue"]),
        }
    )

    @dg.asset(partitions_def=parts)
    def tiles(context: AssetExecutionContext) -> ImageBatch:
        dims = context.partition_key.keys_by_dimension  # type: ignore[attr-defined]
        seed = 1 if dims["color"] == "red" else 2
        return ImageBatch([make_result(f"{dims['color']} tile", [seed])])

    got: list[list[GeneratedImage]] = []

    @dg.asset(partitions_def=parts)
    def tile_check(tiles: list[GeneratedImage]) -> None:
        got.append(tiles)

    key = dg.MultiPartitionKey({"date": "2024-01-02", "color": "blue"})
    result = dg.materialize(
        [tiles, tile_check], partition_key=key, resources={"io_manager": io_manager}
    )
    meta = output_metadata(result, "tiles")
    store = io_manager.store
    assert meta["dagster/uri"] == store.backend.uri("octoai/tiles/color=blue/date=2024-01-02/")
    write_id = store.read_manifest(["tiles"], key)["write_id"]
    assert meta["image_uris"] == [
        store.backend.uri(
            f"octoai/tiles/color=blue/date=2024-01-02/_objects/{write_id}/000-seed2.jpg"
        )
    ]
    [images] = got
    assert [im.data for im in images] == [image_bytes(2)]
    manifest = store.read_manifest(["tiles"], key)
    assert manifest["partition"] == "blue|2024-01-02"
    assert manifest["partition_dimensions"] == {"color": "blue", "date": "2024-01-02"}
    assert manifest["results"][0]["images"][0]["metadata"]["partition"] == "blue|2024-01-02"


def test_partition_range_loads_a_dict(io_manager: Any) -> None:
    daily = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-05")

    @dg.asset(partitions_def=daily)
    def frames(context: AssetExecutionContext) -> ImageBatch:
        day = int(context.partition_key[-2:])
        return ImageBatch([make_result(f"day {day}", [day])])

    got: list[Any] = []

    @dg.asset(
        partitions_def=daily,
        ins={
            "frames": dg.AssetIn(partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-1))
        },
    )
    def pairs(frames: Any) -> None:
        got.append(frames)

    resources = {"io_manager": io_manager}
    for day in ("2024-01-01", "2024-01-02", "2024-01-03"):
        dg.materialize([frames], partition_key=day, resources=resources)
    dg.materialize(
        [frames, pairs], selection=[pairs], partition_key="2024-01-03", resources=resources
    )
    [by_day] = got
    assert list(by_day) == ["2024-01-02", "2024-01-03"]
    assert [im.data for im in by_day["2024-01-02"]] == [image_bytes(2)]
    assert [im.data for im in by_day["2024-01-03"]] == [image_bytes(3)]


def test_annotation_list_flattens_a_range(tmp_path: Path) -> None:
    parts = dg.StaticPartitionsDefinition(["a", "b"])
    io_manager = LocalImageIOManager(base_dir=str(tmp_path))

    @dg.asset(partitions_def=parts)
    def src(context: AssetExecutionContext) -> ImageBatch:
        return ImageBatch([make_result(context.partition_key, [ord(context.partition_key)])])

    got: list[Any] = []

    @dg.asset
    def flat(src: list[GeneratedImage]) -> None:
        got.append(src)

    for key in ("a", "b"):
        dg.materialize([src], partition_key=key, resources={"io_manager": io_manager})
    dg.materialize([src, flat], selection=[flat], resources={"io_manager": io_manager})
    [images] = got
    assert [im.seed for im in images] == [ord("a"), ord("b")]
    assert [im.partition_key for im in images] == ["a", "b"]


def test_reuse_through_the_io_manager(io_manager: Any) -> None:
    request = make_result("a red fox", [11, 12], steps=20).request
    paid: list[int] = []

    @dg.asset(required_resource_keys={"io_manager"})
    def foxes(context: AssetExecutionContext) -> ImageBatch:
        found = context.resources.io_manager.find_existing(request, context.asset_key, None)
        if found is not None:
            return ImageBatch([found])
        paid.append(1)
        return ImageBatch([make_result("a red fox", [11, 12], steps=20)])

    resources = {"io_manager": io_manager}
    first = dg.materialize([foxes], resources=resources)
    second = dg.materialize([foxes], resources=resources)
    assert paid == [1]
    meta = output_metadata(second, "foxes")
    assert meta["reused"] == 2
    # Copied server-side into the new write's own keys: the same bytes, not the same keys.
    first_uris = output_metadata(first, "foxes")["image_uris"]
    assert [u.rsplit("/", 1)[1] for u in meta["image_uris"]] == [
        u.rsplit("/", 1)[1] for u in first_uris
    ]
    manifest = io_manager.store.read_manifest(["foxes"], None)
    assert manifest["run_id"] == second.run_id
    assert manifest["results"][0]["reused_from"] == io_manager.store.backend.uri(
        "octoai/foxes/manifest.json"
    )
    assert [im.data for im in io_manager.store.read(["foxes"], None)] == [
        image_bytes(11),
        image_bytes(12),
    ]
    assert io_manager.find_existing(request, dg.AssetKey(["foxes"])) is not None
    # Another asset finds it only through the fingerprint index, which is opt-in.
    assert io_manager.find_existing(request, "other/asset") is None
    indexed = type(io_manager)(**{**io_manager.model_dump(), "fingerprint_index": True})
    dg.materialize([foxes], resources={"io_manager": indexed})
    assert paid == [1]
    assert indexed.find_existing(request, "other/asset") is not None


def test_lazy_batch_through_materialize(io_manager: Any) -> None:
    count = 40

    @dg.asset
    def film() -> ImageBatch:
        def frames() -> Iterator[ImageGenerationResponse]:
            for i in range(count):
                yield make_result(
                    f"frame {i}", [i], removed=frozenset({7}) if i == 7 else frozenset()
                )

        return ImageBatch(frames(), expected_images=count)

    result = dg.materialize([film], resources={"io_manager": io_manager})
    meta = output_metadata(result, "film")
    assert meta["images"] == count and meta["removed_for_safety"] == 1
    assert len(meta["image_uris"]) == count - 1
    images = io_manager.store.read(["film"], None)
    assert [im.seed for im in images] == [i for i in range(count) if i != 7]
    assert all(sha(im.data) == im.metadata["sha256"] for im in images)


def test_wrong_output_type_is_a_clear_error(tmp_path: Path) -> None:
    @dg.asset
    def not_images() -> dict[str, int]:
        return {"a": 1}

    with pytest.raises(TypeError, match="ImageBatch"):
        dg.materialize(
            [not_images], resources={"io_manager": LocalImageIOManager(base_dir=str(tmp_path))}
        )


# ---- S3 only -------------------------------------------------------------------------


def test_bad_credentials_fail_the_run_clearly(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    @dg.asset
    def foxes() -> ImageBatch:
        return ImageBatch([make_result("x", [1])])

    io = s3_io(seaweedfs, s3_bucket, aws_secret_access_key="not-the-secret")
    with pytest.raises(StorageError, match="refused the credentials") as info:
        dg.materialize([foxes], resources={"io_manager": io})
    assert "not-the-secret" not in str(info.value)


def test_missing_bucket_fails_the_run_clearly(seaweedfs: SeaweedFS) -> None:
    @dg.asset
    def foxes() -> ImageBatch:
        return ImageBatch([make_result("x", [1])])

    io = s3_io(seaweedfs, "no-such-bucket")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        dg.materialize([foxes], resources={"io_manager": io})


def test_config_errors_name_the_field() -> None:
    with pytest.raises(Exception, match="bucket"):
        S3ImageIOManager(bucket="No_Such..Bucket")
    with pytest.raises(Exception, match="addressing_style"):
        S3ImageIOManager(bucket="bkt", addressing_style="sideways")
    with pytest.raises(Exception, match="prefix"):
        LocalImageIOManager(base_dir="/tmp/x", prefix="a/../../b")
    with pytest.raises(Exception, match="convert_to"):
        LocalImageIOManager(base_dir="/tmp/x", convert_to="bmp")


def test_secret_never_shown(
    seaweedfs: SeaweedFS, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_S3_SECRET", seaweedfs.secret_key)
    io = s3_io(seaweedfs, s3_bucket, aws_secret_access_key=dg.EnvVar("TEST_S3_SECRET"))
    assert seaweedfs.secret_key not in repr(io) and seaweedfs.secret_key not in str(io)

    @dg.asset
    def foxes() -> ImageBatch:
        return ImageBatch([make_result("x", [1])])

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([foxes], resources={"io_manager": io}, instance=instance)
    assert result.success
    logs = instance.all_logs(result.run_id)
    assert all(seaweedfs.secret_key not in str(e) for e in logs)
    assert seaweedfs.secret_key not in repr(io.store.backend)


# ---- end to end: the real client against the local OctoAI-compatible server ---------------


def test_end_to_end_with_the_local_server(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    server = pytest.importorskip("dagster_octoai.server")
    from dagster_octoai.api.client import OctoAIClient

    token = "octo-e2e-" + secrets.token_hex(8)
    request = ImageGenerationRequest(
        prompt="a lighthouse at dusk", engine="sd", num_images=2, seed=[3, 4], steps=10
    )
    io = s3_io(seaweedfs, s3_bucket)
    instance = dg.DagsterInstance.ephemeral()
    with (
        server.LocalOctoAIServer(server.ServerConfig(token=token)) as srv,
        OctoAIClient(token, base_url=srv.url) as client,
    ):
        answers: list[Any] = []

        @dg.asset(required_resource_keys={"io_manager"})
        def lighthouse(context: AssetExecutionContext) -> ImageGenerationResponse:
            found = context.resources.io_manager.find_existing(request, context.asset_key, None)
            if found is not None:
                return found
            response = client.generate(request)
            answers.append(response)
            return response

        first = dg.materialize([lighthouse], resources={"io_manager": io}, instance=instance)
        second = dg.materialize([lighthouse], resources={"io_manager": io}, instance=instance)
        assert srv.stats()["generation_requests"] == 1  # the second run reused it
        assert output_metadata(second, "lighthouse")["reused"] == 2  # both images

        [response] = answers
        store = io.store
        manifest = store.read_manifest(["lighthouse"], None)
        keys = [im["key"] for im in manifest["results"][0]["images"]]
        write = f"octoai/lighthouse/_objects/{manifest['write_id']}"
        assert keys == [f"{write}/000-seed3.jpg", f"{write}/001-seed4.jpg"]
        stored = [store.backend.get(k) for k in keys]
        assert stored == [im.data for im in response.images]

        # The manifest alone is enough to make the same images again.
        record = manifest["results"][0]["request"]
        again = client.generate(ImageGenerationRequest.from_wire(record["body"], record["engine"]))
        assert [im.data for im in again.images] == stored

    raw_manifest = store.backend.get("octoai/lighthouse/manifest.json").decode()
    assert token not in raw_manifest
    for key in keys:
        assert token not in str(store.backend.head(key))
    for run in (first, second):
        assert all(token not in str(e) for e in instance.all_logs(run.run_id))


def test_bucket_and_prefix_from_env_vars_are_checked_once_resolved(
    seaweedfs: SeaweedFS, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EnvVar fields are validated on their values at run time, not on the variable names."""

    @dg.asset
    def env_configured() -> ImageBatch:
        return ImageBatch([make_result(seeds=[5])])

    def io_manager() -> S3ImageIOManager:
        return S3ImageIOManager(
            bucket=dg.EnvVar("OCTOAI_TEST_BUCKET"),
            prefix=dg.EnvVar("OCTOAI_TEST_PREFIX"),
            endpoint_url=seaweedfs.endpoint_url,
            aws_access_key_id=seaweedfs.access_key,
            aws_secret_access_key=seaweedfs.secret_key,
        )

    monkeypatch.setenv("OCTOAI_TEST_BUCKET", s3_bucket)
    monkeypatch.setenv("OCTOAI_TEST_PREFIX", "from-env")
    result = dg.materialize([env_configured], resources={"io_manager": io_manager()})
    assert result.success
    uri = result.asset_materializations_for_node("env_configured")[0].metadata["dagster/uri"].value
    assert uri == f"s3://{s3_bucket}/from-env/env_configured/"

    monkeypatch.setenv("OCTOAI_TEST_BUCKET", "Not_A_Bucket")
    with pytest.raises(dg.DagsterResourceFunctionError) as raised:
        dg.materialize([env_configured], resources={"io_manager": io_manager()})
    causes = []
    error: BaseException | None = raised.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__
    assert any("bucket: 'Not_A_Bucket' is not a bucket name" in c for c in causes), causes
