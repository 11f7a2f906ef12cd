"""Dagster for video: ``octoai_video_asset`` and the video IO managers.

A video asset animates, per partition, the image an upstream asset stored for that
partition (e.g. an ``octoai_image_asset``'s product shot): the request is a template (every
field of :class:`~dagster_octoai.api.video.VideoGenerationRequest` but ``image``) plus that
image. Its IO manager stores the MP4s with the image store's layout and commit protocol
(:mod:`dagster_octoai.storage.videos`), a manifest recording the full request, and the
seed, parameters, duration, frame count, fps, size and a poster frame as metadata. A
request with explicit seeds that the output already holds is not paid for again.
"""

# No `from __future__ import annotations`: Dagster reads the compute function's annotations.

import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    In,
    InputContext,
    MaterializeResult,
    MetadataValue,
    OpDefinition,
    OpExecutionContext,
    Out,
    Output,
    OutputContext,
    PartitionsDefinition,
    asset,
    op,
)
from PIL import Image
from typing_extensions import Unpack

from .api.errors import StorageError
from .api.models import GeneratedImage, ImageGenerationResponse
from .api.video import VideoGenerationRequest, VideoGenerationResponse, VideoJob
from .assets import AssetOptions, asset_arguments, asset_with
from .async_assets import (
    JOB_KIND_METADATA,
    _octoai,
    _one_partition,
    check_async_size,
    collectable_job,
    job_metadata,
    record_persisted,
    submit_all,
)
from .io_managers import LocalImageIOManager, S3ImageIOManager, _input_path, _output_path
from .storage.manifest import Manifest
from .storage.videos import VideoStore, poster_data_uri

__all__ = [
    "LocalVideoIOManager",
    "S3VideoIOManager",
    "octoai_async_video_results_asset",
    "octoai_async_video_submit_asset",
    "octoai_video_asset",
    "octoai_video_op",
]


def _image_bytes(value: Any, where: str) -> bytes:
    """The picture an upstream asset's output holds (its first image)."""
    if isinstance(value, ImageGenerationResponse):
        value = value.images
    if isinstance(value, Sequence) and not isinstance(value, (bytes, str)) and value:
        value = value[0]
    if isinstance(value, GeneratedImage):
        return value.data
    if isinstance(value, bytes):
        return value
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(
        f"{where}: the upstream output is a {type(value).__name__}; expected images "
        "(an image IO manager's list of GeneratedImage), a PIL image or bytes"
    )


class _VideoIO:
    """What both video IO managers do, over their image twin's storage backend."""

    def video_store(self) -> VideoStore:
        return VideoStore(self._backend(), self.prefix)  # type: ignore[attr-defined]

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if not isinstance(obj, VideoGenerationResponse):
            raise StorageError(
                f"{type(self).__name__} stores video answers (VideoGenerationResponse), "
                f"got {type(obj).__name__}"
            )
        partition = context.partition_key if context.has_partition_key else None
        store = self.video_store()
        manifest = obj.reused_manifest
        if manifest is None:
            manifest = store.write(
                obj,
                asset_key=_output_path(context),
                partition_key=partition,
                run_id=context.run_id,
            )
        context.add_output_metadata(_metadata(manifest, obj, store))

    def load_input(self, context: InputContext) -> list[bytes]:
        partition = context.partition_key if context.has_partition_key else None
        return self.video_store().read(_input_path(context), partition)


def _metadata(
    manifest: Manifest, answer: VideoGenerationResponse, store: VideoStore
) -> dict[str, Any]:
    videos = [im for im in manifest.images() if im.key]
    meta: dict[str, Any] = {
        "manifest": MetadataValue.url(f"{manifest.uri}manifest.json"),
        "videos": len(videos),
        "seeds": MetadataValue.json([im.seed for im in manifest.images()]),
        "parameters": MetadataValue.json(
            {k: v for k, v in manifest.results[0].request.body.items() if k != "image"}
        ),
        "reused": answer.reused_manifest is not None,
    }
    if videos:
        first = videos[0]
        meta.update(
            {
                "seed": first.seed,
                "duration_s": float(first.metadata["duration_s"]),
                "frames": int(first.metadata["frames"]),
                "fps": float(first.metadata["fps"]),
                "width": first.width or 0,
                "height": first.height or 0,
                "video_uri": MetadataValue.url(first.uri or ""),
            }
        )
        assert first.key is not None
        poster = poster_data_uri(store.backend.get(first.key))
        meta["poster"] = MetadataValue.md(f"![poster frame, seed {first.seed}]({poster})")
    return meta


class S3VideoIOManager(_VideoIO, S3ImageIOManager):  # type: ignore[misc]
    """Stores video answers in S3 (or an S3-compatible store) with the images' layout.

    The connection settings are :class:`~dagster_octoai.S3ImageIOManager`'s.
    """


class LocalVideoIOManager(_VideoIO, LocalImageIOManager):  # type: ignore[misc]
    """Stores video answers in a local directory with the images' layout."""


def octoai_video_asset(
    name: str,
    *,
    image: str | Sequence[str] | AssetKey,
    template: Mapping[str, Any] | None = None,
    partitions_def: PartitionsDefinition[Any] | None = None,
    io_manager_key: str = "video_io_manager",
    resource_key: str = "octoai",
    group_name: str | None = None,
    key_prefix: Sequence[str] | None = None,
) -> AssetsDefinition:
    """A video asset: per partition, the upstream ``image`` asset's picture animated by SVD.

    Args:
        name: The asset's name.
        image: The upstream asset whose output (per partition) is the image to animate.
        template: The request's fields but ``image`` (``seed``, ``fps``, ``motion_scale``...),
            validated here, at definition time.
        partitions_def: Usually the upstream asset's (one clip per item).
        io_manager_key: A video IO manager (:class:`S3VideoIOManager`, :class:`LocalVideoIOManager`).
        resource_key: The :class:`~dagster_octoai.OctoAIResource`.
        key_prefix: Segments before ``name`` in the asset's key.
    """
    fields = _template(template)
    upstream = image if isinstance(image, AssetKey) else AssetKey(image)

    @asset(
        name=name,
        key_prefix=list(key_prefix) if key_prefix else None,
        ins={"picture": AssetIn(key=upstream)},
        partitions_def=partitions_def,
        io_manager_key=io_manager_key,
        required_resource_keys={resource_key, io_manager_key},
        group_name=group_name,
        kinds={"octoai", "video"},
    )
    def _video(context: AssetExecutionContext, picture: Any) -> VideoGenerationResponse:
        data = _image_bytes(picture, f"asset {name!r} input {upstream.to_user_string()!r}")
        request = VideoGenerationRequest.build({**fields, "image": data})
        partition = context.partition_key if context.has_partition_key else None
        io_manager = getattr(context.resources, io_manager_key)
        if isinstance(io_manager, _VideoIO):
            existing = io_manager.video_store().find_existing(
                request, context.asset_key.path, partition
            )
            if existing is not None:
                context.log.info(f"reusing {existing.uri}: the same request with the same seeds")
                return VideoGenerationResponse(videos=[], prediction_time_ms=0.0)._reuse(
                    request, existing
                )
        client = getattr(context.resources, resource_key).client
        answer: VideoGenerationResponse = client.generate_video(request)
        return answer

    return _video


def _template(template: Mapping[str, Any] | None) -> dict[str, Any]:
    """A request template without ``image``, every field checked now (with a stand-in picture)."""
    fields = dict(template or {})
    if "image" in fields:
        raise ValueError("template: leave 'image' out; the upstream output's image is used")
    VideoGenerationRequest.build({**fields, "image": Image.new("RGB", (8, 8))})
    return fields


def octoai_video_op(
    name: str = "octoai_video",
    template: Mapping[str, Any] | None = None,
    *,
    resource_key: str = "octoai",
    io_manager_key: str = "video_io_manager",
) -> OpDefinition:
    """An op animating its ``image`` input (an upstream output's first image) into videos.

    Examples:
        >>> octoai_video_op("clip", {"seed": 7, "fps": 6}).name
        'clip'
    """
    fields = _template(template)

    @op(
        name=name,
        ins={"image": In()},
        out=Out(VideoGenerationResponse, io_manager_key=io_manager_key),
        required_resource_keys={resource_key},
        description="Animate an image with OctoAI's /generate/svd.",
    )
    def _video(context: OpExecutionContext, image: Any) -> VideoGenerationResponse:
        request = VideoGenerationRequest.build(
            {**fields, "image": _image_bytes(image, f"op {name!r} input 'image'")}
        )
        answer: VideoGenerationResponse = getattr(
            context.resources, resource_key
        ).client.generate_video(request)
        return answer

    return _video


# ---- the async path: submit, sensor, results ------------------------------------------------


def octoai_async_video_submit_asset(
    name: str,
    *,
    image: str | Sequence[str] | AssetKey,
    results_asset: AssetsDefinition | str,
    template: Mapping[str, Any] | None = None,
    partitions_def: PartitionsDefinition[Any] | None = None,
    ledger_resource_key: str = "octoai_ledger",
    octoai_resource_key: str = "octoai",
    io_manager_key: str | None = None,
    **options: Unpack[AssetOptions],
) -> AssetsDefinition:
    """An asset that submits, per partition, an async video job animating the upstream image.

    The images' :func:`~dagster_octoai.octoai_async_submit_asset` for videos: the request
    (``template`` plus the ``image`` asset's picture for the partition) is validated and
    checked against the 10 MB async body limit, the video IO manager is checked
    (``preflight``), and the job is recorded in the ledger (an intent before its POST, sent
    with an ``Idempotency-Key``) before the asset returns. A job already in the ledger for
    this asset, partition and request (an earlier attempt of the run, or explicit seeds
    already persisted) is not submitted again. :func:`~dagster_octoai.octoai_async_sensor`
    on ``results_asset`` polls it and asks for the run that stores its MP4s.

    Args:
        name: Asset name.
        image: The upstream asset whose output (per partition) is the image to animate.
        results_asset: The :func:`octoai_async_video_results_asset` the videos land in.
        template: The request's fields but ``image`` (``seed``, ``fps``...), checked now.
        partitions_def: Usually the upstream asset's (one clip per item).
        ledger_resource_key: Key of the :class:`~dagster_octoai.JobLedgerResource`.
        octoai_resource_key: Key of the :class:`~dagster_octoai.OctoAIResource`.
        io_manager_key: The video IO manager of ``results_asset``, checked before
            submitting; defaults to ``results_asset``'s own when it is an ``AssetsDefinition``.
        **options: The ``@asset`` options (:class:`~dagster_octoai.assets.AssetOptions`).

    Examples:
        >>> jobs = octoai_async_video_submit_asset(
        ...     "clip_jobs", image="product_shot", template={"seed": 7}, results_asset="clips")
        >>> jobs.key.to_user_string()
        'clip_jobs'
    """
    fields = _template(template)
    upstream = image if isinstance(image, AssetKey) else AssetKey(image)
    target = (
        results_asset.key.to_user_string()
        if isinstance(results_asset, AssetsDefinition)
        else results_asset
    )
    if io_manager_key is None and isinstance(results_asset, AssetsDefinition):
        io_manager_key = results_asset.get_io_manager_key_for_asset_key(results_asset.key)
    store_keys = set() if io_manager_key is None else {io_manager_key}

    @asset_with(
        name=name,
        ins={"picture": AssetIn(key=upstream)},
        partitions_def=partitions_def,
        required_resource_keys={ledger_resource_key, octoai_resource_key, *store_keys},
        **asset_arguments(
            options,
            description=f"Submits OctoAI async video jobs whose MP4s are stored by {target}.",
        ),
    )
    def _submit(context: AssetExecutionContext, picture: Any) -> MaterializeResult[None]:
        _one_partition(context, "the async video submit asset")
        where = f"asset {name!r} input {upstream.to_user_string()!r}"
        request = VideoGenerationRequest.build({**fields, "image": _image_bytes(picture, where)})
        check_async_size(request, "image")
        return submit_all(
            context,
            [request],
            target=target,
            ledger_resource_key=ledger_resource_key,
            octoai_resource_key=octoai_resource_key,
            io_manager_key=io_manager_key,
            max_concurrency=1,
        )

    return _submit


def octoai_async_video_results_asset(
    name: str,
    *,
    partitions_def: DynamicPartitionsDefinition | None = None,
    ledger_resource_key: str = "octoai_ledger",
    octoai_resource_key: str = "octoai",
    io_manager_key: str = "video_io_manager",
    **options: Unpack[AssetOptions],
) -> AssetsDefinition:
    """The asset that fetches one completed async video job and hands it to the video IO manager.

    Partitioned by a dynamic partition per response id, added by
    :func:`~dagster_octoai.octoai_async_sensor` (give it this asset). The output is the
    job's :class:`~dagster_octoai.api.video.VideoGenerationResponse`, carrying its request
    and ``response_id``, so the video IO manager stores the MP4s with the sync video
    asset's layout, commit protocol and metadata (seed, parameters, duration, frame count,
    fps, size, poster frame, manifest); then the ledger records the job ``persisted``. A
    job the ledger gave up (failed, expired, cancelled) fails the run with its details.

    Examples:
        >>> clips = octoai_async_video_results_asset("clips")
        >>> clips.partitions_def.name
        'clips_jobs'
    """
    pdef = partitions_def or DynamicPartitionsDefinition(name=f"{name}_jobs")

    @asset_with(
        name=name,
        partitions_def=pdef,
        required_resource_keys={ledger_resource_key, octoai_resource_key, io_manager_key},
        io_manager_key=io_manager_key,
        **asset_arguments(
            options,
            description="Videos of one OctoAI async video job (partition = response id).",
            metadata={JOB_KIND_METADATA: "video"},
        ),
    )
    def _results(context: AssetExecutionContext) -> Iterator[Any]:
        ledger, record = collectable_job(context, ledger_resource_key, "video")
        job = record.job()
        assert isinstance(job, VideoJob)  # collectable_job checked the kind
        answer = _octoai(context, octoai_resource_key).client.fetch_video(job)
        yield Output(
            answer,
            metadata={
                **job_metadata(record),
                "ledger_open_jobs": MetadataValue.int(len(ledger.list_open())),
            },
        )
        # Dagster resumes this generator only after the IO manager stored the output.
        record_persisted(ledger, record, context.log)

    return _results
