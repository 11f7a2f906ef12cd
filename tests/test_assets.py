"""The asset factory against the local OctoAI-compatible server, over real HTTP: every mode."""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import io
from typing import Any

import pytest
from _support import ephemeral_instance, octoai, s3_images
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    DagsterInstance,
    MaterializeResult,
    StaticPartitionsDefinition,
    asset,
    materialize,
)
from PIL import Image, ImageDraw

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.api.errors import RequestValidationError
from dagster_octoai.assets import octoai_image_asset, octoai_image_batch_asset
from dagster_octoai.metadata import MAX_THUMBNAIL_BYTES, data_version_for
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.testing.seaweedfs import s3_bucket, seaweedfs

__all__ = ["ephemeral_instance", "octoai", "s3_bucket", "seaweedfs"]  # fixtures used by this module


def _png(size: tuple[int, int] = (512, 512), *, mode: str = "RGB") -> bytes:
    im = Image.new(mode, size, (30, 60, 90, 255) if mode == "RGBA" else (30, 60, 90))
    ImageDraw.Draw(im).ellipse((100, 100, size[0] - 100, size[1] - 100), fill="white")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _mat(result: Any, key: str) -> Any:
    events = result.asset_materializations_for_node(key)
    assert len(events) == 1
    return events[0]


def _stats_delta(server: Any, before: dict[str, Any]) -> dict[str, int]:
    after = server.stats()
    return {
        "requests": after["generation_requests"] - before["generation_requests"],
        "images": after["paid_generations"] - before["paid_generations"],
    }


def _batch(result: Any, key: str) -> ImageBatch:
    value = result.output_for_node(key)
    assert isinstance(value, ImageBatch)
    return value


# ---- text to image --------------------------------------------------------------------


def test_sdxl_text_to_image_materializes_with_metadata_and_data_version(
    octoai: OctoAIResource, octoai_server: Any
) -> None:
    fox = octoai_image_asset(
        "fox", {"engine": "sdxl", "prompt": "a red fox", "seed": 11, "steps": 4}
    )
    before = octoai_server.stats()
    result = materialize([fox], resources={"octoai": octoai})
    assert result.success
    assert _stats_delta(octoai_server, before) == {"requests": 1, "images": 1}
    batch = _batch(result, "fox")
    assert batch.images[0].size == (1024, 1024)
    mat = _mat(result, "fox")
    md = mat.metadata
    assert md["seeds"].value == [11]
    assert md["engine"].value == "sdxl"
    assert md["request"].value == {"engine": "sdxl", "prompt": "a red fox", "seed": 11, "steps": 4}
    assert md["images"].value == 1 and md["removed_for_safety"].value == 0
    assert md["octoai/generated_images"].value == 1 and md["octoai/steps"].value == 4
    assert md["engine"].value == "sdxl"
    assert len(md["octoai/request_ids"].value) == 1
    thumb = md["thumbnail"].value
    assert thumb.startswith("![seed 11](data:image/jpeg;base64,")
    assert len(thumb) < MAX_THUMBNAIL_BYTES
    assert mat.tags["dagster/data_version"] == data_version_for(batch).value


def test_sd15_static_partitions_regenerate_only_the_partition_rerun(
    octoai: OctoAIResource, octoai_server: Any, instance: DagsterInstance
) -> None:
    parts = StaticPartitionsDefinition(["a", "b", "c"])
    pics = octoai_image_asset(
        "pics",
        {"engine": "sd", "steps": 3, "seed": 5},
        prompt_template="a photo of {partition_key}",
        partitions_def=parts,
    )
    versions = []
    for _ in range(2):
        before = octoai_server.stats()
        result = materialize(
            [pics], partition_key="b", resources={"octoai": octoai}, instance=instance
        )
        assert result.success
        assert _stats_delta(octoai_server, before) == {"requests": 1, "images": 1}
        mat = _mat(result, "pics")
        assert mat.partition == "b"
        assert mat.metadata["request"].value["prompt"] == "a photo of b"
        versions.append(mat.tags["dagster/data_version"])
    # Same request, same explicit seed: the lineage shows the image would not change.
    assert versions[0] == versions[1]
    materialized = instance.get_materialized_partitions(AssetKey("pics"))
    assert materialized == {"b"}


# ---- image-to-image modes -----------------------------------------------------------


def test_img2img_takes_init_image_from_upstream_asset(
    octoai: OctoAIResource, octoai_server: Any
) -> None:
    @asset
    def photo() -> bytes:
        return _png()

    variation = octoai_image_asset(
        "variation",
        {"engine": "sd", "prompt": "oil painting", "strength": 0.4, "seed": 3, "steps": 3},
        ins={"photo": AssetIn("photo")},
        image_inputs={"init_image": "photo"},
    )
    result = materialize([photo, variation], resources={"octoai": octoai})
    assert result.success
    req = _batch(result, "variation").responses[0].request
    assert req.strength == 0.4 and req.init_image is not None
    summary = _mat(result, "variation").metadata["request"].value
    assert summary["init_image"].startswith("<image ")  # a digest, never the payload


def test_inpainting_with_mask_from_template(octoai: OctoAIResource) -> None:
    mask = Image.new("L", (512, 512), 0)
    ImageDraw.Draw(mask).rectangle((128, 128, 384, 384), fill=255)
    patched = octoai_image_asset(
        "patched",
        {
            "engine": "sd",
            "prompt": "a window",
            "init_image": _png(),
            "mask_image": mask,
            "seed": 1,
            "steps": 3,
        },
    )
    result = materialize([patched], resources={"octoai": octoai})
    assert result.success
    summary = _mat(result, "patched").metadata["request"].value
    assert set(summary) >= {"init_image", "mask_image"}
    assert _batch(result, "patched").images[0].size == (512, 512)


def test_outpainting(octoai: OctoAIResource) -> None:
    wider = octoai_image_asset(
        "wider",
        {
            "engine": "sd",
            "prompt": "more landscape",
            "init_image": _png((512, 512), mode="RGBA"),
            "outpainting": True,
            "width": 768,
            "height": 512,
            "seed": 2,
            "steps": 3,
        },
    )
    result = materialize([wider], resources={"octoai": octoai})
    assert result.success
    assert _batch(result, "wider").images[0].size == (768, 512)
    assert _mat(result, "wider").metadata["request"].value["outpainting"] is True


def test_photo_merge_transfer_images_from_upstream(octoai: OctoAIResource) -> None:
    @asset
    def portraits() -> list[bytes]:
        return [_png(), _png((512, 768))]

    merged = octoai_image_asset(
        "merged",
        {"engine": "sdxl", "prompt": "sks person as an astronaut", "seed": 4, "steps": 3},
        ins={"portraits": AssetIn("portraits")},
        image_inputs={"transfer_images.sks": "portraits"},
    )
    result = materialize([portraits, merged], resources={"octoai": octoai})
    assert result.success
    req = _batch(result, "merged").responses[0].request
    assert req.transfer_images is not None and len(req.transfer_images["sks"]) == 2


# ---- ControlNet ---------------------------------------------------------------------


def test_controlnet_sd15_with_server_preprocessing(octoai: OctoAIResource) -> None:
    guided = octoai_image_asset(
        "guided",
        {
            "engine": "controlnet-sd15",
            "prompt": "a house",
            "controlnet": "octoai:canny_sd15",
            "controlnet_image": _png(),
            "seed": 9,
            "steps": 3,
        },
    )
    result = materialize([guided], resources={"octoai": octoai})
    assert result.success
    md = _mat(result, "guided").metadata
    assert md["model_assets"].value == {"controlnet": "octoai:canny_sd15"}
    assert "controlnet_preprocess" not in md["request"].value  # server default: preprocess


def test_controlnet_sdxl_local_edge_map_from_generated_upstream(
    octoai: OctoAIResource, octoai_server: Any
) -> None:
    base = octoai_image_asset(
        "base", {"engine": "sdxl", "prompt": "a castle", "seed": 1, "steps": 3}
    )
    edges = octoai_image_asset(
        "edges",
        {"engine": "controlnet-sdxl", "controlnet": "octoai:canny_sdxl", "seed": 1, "steps": 3},
        prompt_template="a castle at night",
        ins={"base": AssetIn("base")},
        image_inputs={"controlnet_image": "base"},
        local_edge_map=True,
    )
    before = octoai_server.stats()
    result = materialize([base, edges], resources={"octoai": octoai})
    assert result.success
    assert _stats_delta(octoai_server, before)["requests"] == 2
    req = _batch(result, "edges").responses[0].request
    assert req.controlnet_preprocess is False
    control = Image.open(io.BytesIO(__import__("base64").b64decode(req.controlnet_image)))
    assert control.size == (1024, 1024)
    assert set(control.convert("L").getdata()) <= {0, 255}


# ---- plain resource use, failures, checks -------------------------------------------


def test_plain_resource_in_users_own_asset(octoai: OctoAIResource) -> None:
    @asset
    def own(context: AssetExecutionContext, octoai: OctoAIResource) -> MaterializeResult:
        with octoai.get_client(context) as client:
            response = client.generate({"prompt": "a lighthouse", "engine": "sd", "num_images": 2})
        return MaterializeResult(metadata={"seeds": response.seeds})

    result = materialize([own], resources={"octoai": octoai})
    assert result.success
    md = _mat(result, "own").metadata
    assert md["octoai/generated_images"].value == 2
    assert md["octoai/steps"].value == 60  # the service default of 30 steps, per image
    assert len(md["seeds"].value) == 2


def test_bad_run_config_fails_naming_the_field_before_anything_is_sent(
    octoai: OctoAIResource, octoai_server: Any
) -> None:
    pics = octoai_image_asset("pics", {"engine": "sd", "prompt": "x"})
    before = octoai_server.stats()
    result = materialize(
        [pics],
        resources={"octoai": octoai},
        run_config={"ops": {"pics": {"config": {"steps": 500}}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.message
    assert "steps" in message and "200" in message
    assert _stats_delta(octoai_server, before)["requests"] == 0


def test_bad_template_fails_when_definitions_load() -> None:
    with pytest.raises(RequestValidationError, match="width"):
        octoai_image_asset("bad", {"engine": "sd", "prompt": "x", "width": 1024, "height": 1024})
    with pytest.raises(ValueError, match="image_inputs"):
        octoai_image_asset("bad", {"prompt": "x"}, image_inputs={"init_image": "missing"})


def test_built_in_checks_pass_and_safety_check_fails_on_removed_images(
    octoai: OctoAIResource, octoai_server: Any
) -> None:
    word = "nsfw"  # the server's default safety trigger word
    ok = octoai_image_asset("ok", {"engine": "sd", "prompt": "a cat", "steps": 3})
    blocked = octoai_image_asset("blocked", {"engine": "sd", "prompt": f"a {word} cat", "steps": 3})
    result = materialize([ok, blocked], resources={"octoai": octoai})
    assert result.success
    evals = {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}
    assert len(evals) == 6
    assert all(
        evals[("ok", n)].passed
        for n in ("no_images_removed_for_safety", "image_sizes_as_requested", "images_decode")
    )
    assert not evals[("blocked", "no_images_removed_for_safety")].passed
    assert (
        evals[("blocked", "no_images_removed_for_safety")].metadata["removed_for_safety"].value == 1
    )
    assert _mat(result, "blocked").metadata["removed_for_safety"].value == 1


def test_reuse_existing_with_explicit_seed_pays_once(
    octoai: OctoAIResource, octoai_server: Any, tmp_path: Any
) -> None:
    from dagster_octoai.io_managers import LocalImageIOManager

    same = octoai_image_asset(
        "same",
        {"engine": "sd", "prompt": "a boat", "seed": 42, "steps": 3},
        io_manager_key="images",
    )
    resources = {"octoai": octoai, "images": LocalImageIOManager(base_dir=str(tmp_path))}
    before = octoai_server.stats()
    first = materialize([same], resources=resources)
    second = materialize([same], resources=resources)
    assert first.success and second.success
    assert _stats_delta(octoai_server, before) == {"requests": 1, "images": 1}
    assert _mat(first, "same").metadata["reused"].value == 0
    md = _mat(second, "same").metadata
    assert md["reused"].value == 1
    assert md["seeds"].value == [42]
    assert md["octoai/generated_images"].value == 0  # nothing paid for on the reuse


# ---- storage checked before anything is paid for --------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing bucket", r"bucket 'no-such-bucket' does not exist"),
        ("refused credentials", r"S3 refused the credentials .*aws_secret_access_key"),
    ],
)
def test_bad_image_store_fails_before_a_random_seed_request_is_paid(
    case: str,
    message: str,
    octoai: OctoAIResource,
    octoai_server: Any,
    seaweedfs: Any,
    s3_bucket: str,
) -> None:
    from dagster_octoai.storage import StorageError

    # Random seeds: nothing reads the store on the way (no reuse lookup) but the preflight.
    asset_def = octoai_image_asset(
        "unstored", {"engine": "sd", "prompt": "a kite", "steps": 3}, io_manager_key="images"
    )
    if case == "missing bucket":
        images = s3_images(seaweedfs, "no-such-bucket")
    else:
        images = s3_images(seaweedfs, s3_bucket, aws_secret_access_key="wrong-secret-value")
    before = octoai_server.stats()
    with pytest.raises(StorageError, match=message) as info:
        materialize([asset_def], resources={"octoai": octoai, "images": images})
    assert "nothing was generated or paid for" in str(info.value)
    assert "IO manager 'images'" in str(info.value)
    assert "wrong-secret-value" not in str(info.value)
    assert _stats_delta(octoai_server, before) == {"requests": 0, "images": 0}


def test_a_good_image_store_passes_the_preflight_and_stores(
    octoai: OctoAIResource, octoai_server: Any, seaweedfs: Any, s3_bucket: str
) -> None:
    asset_def = octoai_image_asset(
        "stored", {"engine": "sd", "prompt": "a kite", "steps": 3}, io_manager_key="images"
    )
    images = s3_images(seaweedfs, s3_bucket)
    before = octoai_server.stats()
    result = materialize([asset_def], resources={"octoai": octoai, "images": images})
    assert result.success
    assert _stats_delta(octoai_server, before) == {"requests": 1, "images": 1}
    assert len(images.store.read(["stored"], None)) == 1


# ---- streaming many requests ----------------------------------------------------------


def test_streamed_asset_of_60_images_records_usage_checks_and_persists_all(
    octoai: OctoAIResource, octoai_server: Any, seaweedfs: Any, s3_bucket: str
) -> None:
    count = 60
    frames = octoai_image_batch_asset(
        "frames",
        {"engine": "sd", "steps": 2},
        lambda partition_key, inputs: [
            {"prompt": f"a paper boat, frame {i}", "seed": 1000 + i} for i in range(count)
        ],
        prompt_template="a paper boat, frame",
        io_manager_key="images",
    )
    images = s3_images(seaweedfs, s3_bucket)
    before = octoai_server.stats()
    result = materialize([frames], resources={"octoai": octoai, "images": images})
    assert result.success
    assert _stats_delta(octoai_server, before) == {"requests": count, "images": count}
    md = {k: v.value for k, v in _mat(result, "frames").metadata.items()}
    assert md["octoai/generated_images"] == count and md["octoai/calls"] == count
    assert md["octoai/steps"] == 2 * count and md["engine"] == "sd"
    assert md["images"] == count and md["streamed"] is True
    assert md["expected_images"] == count
    stored = images.store.read(["frames"], None)
    assert sorted(im.seed for im in stored) == [1000 + i for i in range(count)]
    assert {im.request.prompt for im in stored} == {
        f"a paper boat, frame {i}" for i in range(count)
    }
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) == {
        "no_images_removed_for_safety",
        "image_sizes_as_requested",
        "images_decode",
    }
    assert all(c.passed for c in checks.values())
    assert checks["images_decode"].metadata["checked"].value == count


def test_streamed_asset_refuses_a_bad_request_before_sending_any(
    octoai: OctoAIResource, octoai_server: Any, tmp_path: Any
) -> None:
    from dagster import Failure

    from dagster_octoai.io_managers import LocalImageIOManager

    frames = octoai_image_batch_asset(
        "bad_frames",
        {"engine": "sd", "steps": 2},
        lambda pk, inputs: [{"prompt": "ok", "seed": 1}, {"prompt": "x", "steps": 0}],
        io_manager_key="images",
    )
    before = octoai_server.stats()
    with pytest.raises(Failure, match=r"requests\[1\]: .*steps"):
        materialize(
            [frames],
            resources={"octoai": octoai, "images": LocalImageIOManager(base_dir=str(tmp_path))},
        )
    assert _stats_delta(octoai_server, before) == {"requests": 0, "images": 0}


def test_a_batch_rerun_reuses_the_explicit_seed_answers_it_already_stored(
    octoai: OctoAIResource, octoai_server: Any, seaweedfs: Any, s3_bucket: str
) -> None:
    # Three explicit seeds and one random: a re-run pays only for the random one.
    items = [{"prompt": f"a kite, frame {i}", "seed": 50 + i} for i in range(3)]
    items.append({"prompt": "a kite, any frame"})
    kites = octoai_image_batch_asset(
        "kites", {"engine": "sd", "steps": 2}, lambda pk, inputs: items, io_manager_key="images"
    )
    images = s3_images(seaweedfs, s3_bucket)
    resources = {"octoai": octoai, "images": images}
    assert materialize([kites], resources=resources).success
    first = {im.seed: im.data for im in images.store.read(["kites"], None)}
    before = octoai_server.stats()
    again = materialize([kites], resources=resources)
    assert again.success
    assert _stats_delta(octoai_server, before) == {"requests": 1, "images": 1}
    stored = images.store.read(["kites"], None)
    assert len(stored) == 4
    reused = {im.seed: im.data for im in stored if im.seed in (50, 51, 52)}
    assert reused == {seed: first[seed] for seed in (50, 51, 52)}
    assert _mat(again, "kites").metadata["octoai/generated_images"].value == 1
    # reuse_existing=False pays for every image again.
    fresh = octoai_image_batch_asset(
        "kites",
        {"engine": "sd", "steps": 2},
        lambda pk, inputs: items,
        io_manager_key="images",
        reuse_existing=False,
    )
    before = octoai_server.stats()
    assert materialize([fresh], resources=resources).success
    assert _stats_delta(octoai_server, before) == {"requests": 4, "images": 4}


def test_a_factory_refuses_an_option_it_does_not_know_naming_the_batch_factory() -> None:
    with pytest.raises(TypeError, match=r"requests: not an option .*octoai_image_batch_asset"):
        octoai_image_asset("x", {"prompt": "x"}, requests=lambda pk, inputs: [])  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"grup_name: not an option"):
        octoai_image_asset("x", {"prompt": "x"}, grup_name="g")  # type: ignore[call-arg]
