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
from collections.abc import Mapping, Sequence
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    In,
    InputContext,
    MetadataValue,
    OpDefinition,
    OpExecutionContext,
    Out,
    OutputContext,
    PartitionsDefinition,
    asset,
    op,
)
from PIL import Image

from .api.errors import StorageError
from .api.models import GeneratedImage, ImageGenerationResponse
from .api.video import VideoGenerationRequest, VideoGenerationResponse
from .io_managers import LocalImageIOManager, S3ImageIOManager, _input_path, _output_path
from .storage.manifest import Manifest
from .storage.videos import VideoStore, poster_data_uri

__all__ = ["LocalVideoIOManager", "S3VideoIOManager", "octoai_video_asset", "octoai_video_op"]


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
