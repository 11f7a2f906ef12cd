"""What a user's own asset returns, stored by the image IO managers and loaded back.

Real parts throughout: the local OctoAI server over loopback, SeaweedFS and a local
directory, and ``materialize``. Each shape an asset may return (the session's answer, a
list of answers, a batch, a lazy batch) is stored with its lineage (manifest, object
metadata, data version) and comes back downstream byte for byte; what cannot be stored is
refused, before anything is paid for where that can be known, and otherwise with an error
that says what to return instead and what was already paid.
"""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from _support import octoai, s3_images

from dagster_octoai import (
    GeneratedImage,
    ImageBatch,
    ImageGenerationRequest,
    ImageGenerationResponse,
    LocalImageIOManager,
    OctoAIResource,
    S3ImageIOManager,
    data_version_for,
)
from dagster_octoai.api.batch import UnstorableValueError
from dagster_octoai.storage import S3Backend
from dagster_octoai.testing.seaweedfs import s3_bucket, seaweedfs

__all__ = ["octoai", "s3_bucket", "seaweedfs"]  # fixtures used by this module

SHAPES = ["answer", "list", "batch", "lazy"]


@pytest.fixture(params=["s3", "local"])
def images(
    request: pytest.FixtureRequest, tmp_path: Path
) -> S3ImageIOManager | LocalImageIOManager:
    if request.param == "s3":
        return s3_images(
            request.getfixturevalue("seaweedfs"),
            request.getfixturevalue("s3_bucket"),
            prefix="shapes",
        )
    return LocalImageIOManager(base_dir=str(tmp_path / "images"), prefix="shapes")


def _requests(prompt: str, seeds: list[int]) -> list[dict[str, Any]]:
    return [{"engine": "sd", "prompt": f"{prompt} {s}", "seed": s, "steps": 2} for s in seeds]


def _returning(shape: str, name: str, seeds: list[int], paid: list[ImageGenerationResponse]) -> Any:
    """A user's own asset that generates ``seeds`` and returns them as ``shape``."""

    @dg.asset(name=name, io_manager_key="images")
    def _asset(context: dg.AssetExecutionContext, octoai: OctoAIResource) -> Any:
        requests = _requests(name, seeds)
        if shape == "lazy":
            streamed = octoai.stream(context, requests, expected_images=len(seeds))

            def watched() -> Iterator[ImageGenerationResponse]:
                for answer in streamed:
                    paid.append(answer)
                    yield answer

            return ImageBatch(watched(), late_metadata=streamed.late_metadata)
        with octoai.get_client(context) as session:
            if shape == "answer":
                # One request with several images: the most natural custom asset.
                answer = session.generate({**requests[0], "seed": seeds, "num_images": len(seeds)})
                paid.append(answer)
                return answer
            answers = session.generate_many(requests)
        paid.extend(answers)
        return answers if shape == "list" else ImageBatch(answers)

    return _asset


def _loads(upstream: str, got: list[list[GeneratedImage]]) -> Any:
    @dg.asset(name=f"{upstream}_loaded", ins={"stored": dg.AssetIn(upstream)})
    def _downstream(stored: list[GeneratedImage]) -> None:
        got.append(stored)

    return _downstream


def _materialization(result: dg.ExecuteInProcessResult, asset: str) -> Any:
    [event] = [
        e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)
    ]
    return event.materialization


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_is_stored_with_its_lineage_and_loads_back_byte_for_byte(
    shape: str, images: Any, octoai: OctoAIResource
) -> None:
    seeds = [31, 32]
    paid: list[ImageGenerationResponse] = []
    got: list[list[GeneratedImage]] = []
    upstream = _returning(shape, f"fox_{shape}", seeds, paid)

    result = dg.materialize(
        [upstream, _loads(f"fox_{shape}", got)],
        resources={"octoai": octoai, "images": images},
    )

    assert result.success
    [loaded] = got
    paid_images = [im for answer in paid for im in answer.images]
    assert [im.data for im in loaded] == [im.data for im in paid_images]  # byte-identical
    assert [im.seed for im in loaded] == [im.seed for im in paid_images]
    assert sorted(im.seed for im in loaded) == seeds  # a lazy batch: in completion order
    assert all(im.request is not None for im in loaded)
    assert [im.request for im in loaded] == [im.request for im in paid_images]
    assert [im.index for im in loaded] == [0, 1]
    # The manifest holds the full request of every answer.
    store = images.store
    manifest = store.read_manifest([f"fox_{shape}"], None)
    assert manifest is not None
    records = [r["request"] for r in manifest["results"]]
    assert records == [
        {"engine": a.request.engine.value, "body": a.request.to_wire()}
        for a in paid
        if a.request is not None
    ]
    # The data version is the one data_version_for gives for the same answers.
    materialization = _materialization(result, f"fox_{shape}")
    assert materialization.tags["dagster/data_version"] == data_version_for(paid).value
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["seeds"] == [im.seed for im in paid_images] and meta["images"] == 2
    assert meta["octoai/generated_images"] == 2  # the session's usage, on this output
    # The request metadata a factory asset records, on your own asset's output too.
    requests = [a.request for a in paid if a.request is not None]
    if len(requests) == 1:
        assert meta["request"] == requests[0].summary()
        assert meta["request_fingerprint"] == requests[0].fingerprint()
        assert meta["size"] == "512x512"
    else:
        assert sorted(r["prompt"] for r in meta["requests"]) == sorted(r.prompt for r in requests)
    if isinstance(store.backend, S3Backend):
        for im, answer_image in zip(loaded, paid_images, strict=True):
            assert im.uri is not None
            key = store.backend.key_for_uri(im.uri)
            assert key is not None
            head = store.backend.head(key)
            assert head["Metadata"]["seed"] == str(im.seed)
            assert answer_image.request is not None
            assert head["Metadata"]["request-fingerprint"] == answer_image.request.fingerprint()
            assert head["Metadata"]["run-id"] == result.run_id


def test_two_assets_in_one_run_keep_their_metadata_apart(
    images: Any, octoai: OctoAIResource
) -> None:
    fox_paid: list[ImageGenerationResponse] = []
    owl_paid: list[ImageGenerationResponse] = []
    fox = _returning("answer", "fox", [1, 2, 3], fox_paid)
    owl = _returning("list", "owl", [9], owl_paid)

    result = dg.materialize([fox, owl], resources={"octoai": octoai, "images": images})

    assert result.success
    fox_meta = {k: v.value for k, v in _materialization(result, "fox").metadata.items()}
    owl_meta = {k: v.value for k, v in _materialization(result, "owl").metadata.items()}
    assert (fox_meta["octoai/generated_images"], owl_meta["octoai/generated_images"]) == (3, 1)
    assert (fox_meta["octoai/calls"], owl_meta["octoai/calls"]) == (1, 1)
    assert (fox_meta["seeds"], owl_meta["seeds"]) == ([1, 2, 3], [9])
    assert all("/fox/" in uri for uri in fox_meta["image_uris"])
    assert all("/owl/" in uri for uri in owl_meta["image_uris"])
    assert fox_meta["manifest_uri"] != owl_meta["manifest_uri"]
    fox_ids = set(fox_meta["octoai/request_ids"])
    owl_ids = set(owl_meta["octoai/request_ids"])
    assert fox_ids and owl_ids and not fox_ids & owl_ids
    versions = {
        _materialization(result, key).tags["dagster/data_version"] for key in ("fox", "owl")
    }
    assert versions == {data_version_for(fox_paid).value, data_version_for(owl_paid).value}
    assert len(versions) == 2
    fox_manifest = images.store.read_manifest(["fox"], None)
    owl_manifest = images.store.read_manifest(["owl"], None)
    assert fox_manifest["results"][0]["request"]["body"]["prompt"] == "fox 1"
    assert owl_manifest["results"][0]["request"]["body"]["prompt"] == "owl 9"


# ---- refused values ---------------------------------------------------------------------


def _failure(result: dg.ExecuteInProcessResult) -> str:
    [failure] = result.get_step_failure_events()
    error = failure.step_failure_data.error
    parts = []
    while error is not None:
        parts.append(f"{error.cls_name}: {error.message}")
        error = error.cause
    return " | ".join(parts)


def test_an_annotation_that_cannot_be_stored_is_refused_before_anything_is_paid(
    images: Any, octoai: OctoAIResource, octoai_server: Any
) -> None:
    @dg.asset(io_manager_key="images")
    def fox_bytes(context: dg.AssetExecutionContext, octoai: OctoAIResource) -> bytes:
        with octoai.get_client(context) as session:
            return session.generate({"engine": "sd", "prompt": "a fox", "seed": 3}).images[0].data

    before = octoai_server.stats()["paid_generations"]
    result = dg.materialize(
        [fox_bytes], resources={"octoai": octoai, "images": images}, raise_on_error=False
    )

    assert not result.success
    text = _failure(result)
    assert "UnstorableValueError" in text
    assert "asset 'fox_bytes' is annotated to return bytes" in text
    assert "nothing was generated or paid for" in text
    assert "Return an ImageGenerationResponse" in text
    assert octoai_server.stats()["paid_generations"] == before
    assert images.store.read_manifest(["fox_bytes"], None) is None


def test_a_lazy_batch_for_an_io_manager_that_cannot_store_it_is_refused_before_paying(
    octoai: OctoAIResource, octoai_server: Any, tmp_path: Path
) -> None:
    @dg.asset
    def frames(context: dg.AssetExecutionContext, octoai: OctoAIResource) -> ImageBatch:
        return octoai.stream(context, _requests("frame", [1, 2]))

    before = octoai_server.stats()["paid_generations"]
    result = dg.materialize(
        [frames],
        resources={"octoai": octoai, "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path))},
        raise_on_error=False,
    )

    assert not result.success
    text = _failure(result)
    assert "stored by IO manager 'io_manager' (PickledObjectFilesystemIOManager)" in text
    assert "S3ImageIOManager or LocalImageIOManager" in text
    assert "Nothing was generated or paid for" in text
    assert octoai_server.stats()["paid_generations"] == before


def test_a_value_refused_after_paying_says_what_to_return_and_what_was_paid(
    images: Any, octoai: OctoAIResource, octoai_server: Any
) -> None:
    @dg.asset(io_manager_key="images")
    def loose(context: dg.AssetExecutionContext, octoai: OctoAIResource):  # type: ignore[no-untyped-def]
        # No annotation to judge by: the images themselves, not the answer that holds them.
        with octoai.get_client(context) as session:
            answer = session.generate(
                {"engine": "sd", "prompt": "a fox", "seed": [41, 42], "num_images": 2}
            )
        return answer.images

    before = octoai_server.stats()["paid_generations"]
    result = dg.materialize(
        [loose], resources={"octoai": octoai, "images": images}, raise_on_error=False
    )

    assert not result.success
    assert octoai_server.stats()["paid_generations"] - before == 2
    text = _failure(result)
    assert f"{type(images).__name__} cannot store the output of asset 'loose'" in text
    assert "a list of GeneratedImage is not some images" in text
    assert "Return an ImageGenerationResponse (what generate(), fetch() and wait() return)" in text
    assert "already paid for and is not stored: 2 image(s); seeds [41, 42]; request ids [" in text
    assert octoai_server.token not in text
    assert images.store.read_manifest(["loose"], None) is None


def test_an_answer_without_its_request_is_refused_naming_why(tmp_path: Path) -> None:
    answer = ImageGenerationResponse.model_validate(
        {"images": [{"image_b64": None, "seed": 5, "removed_for_safety": True}]}
    )

    @dg.asset
    def bare() -> ImageGenerationResponse:
        return answer

    io = LocalImageIOManager(base_dir=str(tmp_path))
    with pytest.raises(UnstorableValueError) as info:
        dg.materialize([bare], resources={"io_manager": io})
    text = str(info.value)
    assert "answer 0 (seeds [5]) carries no request" in text
    assert "client.fetch(job)" in text
    assert "1 image(s); seeds [5]" in text
    assert io.store.read_manifest(["bare"], None) is None


def test_a_stored_answer_reused_by_find_existing_is_stored_again_without_paying(
    images: Any, octoai: OctoAIResource, octoai_server: Any
) -> None:
    request = ImageGenerationRequest(prompt="a heron", engine="sd", seed=[5, 6], num_images=2)

    @dg.asset(io_manager_key="images")
    def heron(context: dg.AssetExecutionContext, octoai: OctoAIResource) -> ImageGenerationResponse:
        found = context.resources.images.find_existing(request, context.asset_key)
        if found is not None:
            return found
        with octoai.get_client(context) as session:
            return session.generate(request)

    resources = {"octoai": octoai, "images": images}
    first = dg.materialize([heron], resources=resources)
    before = octoai_server.stats()["paid_generations"]
    second = dg.materialize([heron], resources=resources)

    assert octoai_server.stats()["paid_generations"] == before
    meta = {k: v.value for k, v in _materialization(second, "heron").metadata.items()}
    assert meta["reused"] == 2
    assert (
        _materialization(first, "heron").tags["dagster/data_version"]
        == _materialization(second, "heron").tags["dagster/data_version"]
    )


@pytest.mark.parametrize(
    "annotation",
    [bytes, str, dict, dict[str, Any], GeneratedImage, list[GeneratedImage], list[bytes]],
)
def test_types_that_are_never_some_images_are_refused(annotation: Any, tmp_path: Path) -> None:
    io = LocalImageIOManager(base_dir=str(tmp_path))
    with pytest.raises(UnstorableValueError, match="nothing was generated or paid for"):
        io.check_output_type(annotation, "asset 'x'")


@pytest.mark.parametrize(
    "annotation",
    [
        Any,
        None,
        ImageGenerationResponse,
        ImageBatch,
        list[ImageGenerationResponse],
        tuple[ImageGenerationResponse, ...],
        ImageGenerationResponse | None,
        ImageBatch | bytes,
        Iterator[Any],
        dg.MaterializeResult,
        list,
        "ForwardRef",
    ],
)
def test_types_that_are_or_may_be_some_images_pass(annotation: Any, tmp_path: Path) -> None:
    LocalImageIOManager(base_dir=str(tmp_path)).check_output_type(annotation, "asset 'x'")
