"""Persisting video answers (``/generate/svd``) under the image store's layout and commit protocol.

An output's videos are written once under ``{output}/_objects/{write id}/`` (a name per
video, ``{index:03d}-seed{seed}.mp4``), then the output's manifest (the same versioned
:class:`~dagster_octoai.storage.manifest.Manifest` as images: each video is an
``ImageRecord`` with ``format="mp4"``) is committed with a conditional PUT on the version
read before the write; only then are the objects the replaced manifest listed deleted. A
writer that loses the race deletes what it wrote and raises ``ConflictError``: the
committed output is always whole.

Reading an MP4's facts (frame count, fps, duration, size, a poster frame) needs PyAV.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from PIL import Image

from ..api.errors import StorageError
from ..api.video import GeneratedVideo, VideoGenerationRequest, VideoGenerationResponse
from .backends import StorageBackend
from .layout import (
    MANIFEST_NAME,
    new_write_id,
    normalize_prefix,
    object_key,
    output_key,
    partition_dimensions,
)
from .manifest import (
    CallRecord,
    ImageRecord,
    Manifest,
    RequestRecord,
    ResultRecord,
    parse_manifest,
)

__all__ = ["VIDEO_CONTENT_TYPE", "VideoFacts", "VideoStore", "poster_data_uri", "probe_mp4"]

VIDEO_CONTENT_TYPE = "video/mp4"


@dataclass(frozen=True)
class VideoFacts:
    """What an MP4 holds: its first video stream's frames, rate, duration and size."""

    width: int
    height: int
    frames: int
    fps: float
    duration_s: float


def probe_mp4(data: bytes) -> VideoFacts:
    """Decode an MP4 (every frame, so the count is what a player shows).

    Raises:
        StorageError: the bytes are not a video PyAV can decode.
    """
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(video=0))
            fps = float(stream.average_rate or 0)
            width, height = stream.width, stream.height
    except (av.error.FFmpegError, IndexError) as exc:
        raise StorageError(f"{len(data)} bytes that are not a decodable MP4 ({exc})") from None
    duration = frames / fps if fps else 0.0
    return VideoFacts(width, height, frames, fps, round(duration, 3))


def poster_data_uri(data: bytes, max_side: int = 160) -> str:
    """The first frame as a small PNG ``data:`` URI, for markdown metadata in the Dagster UI."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        frame = next(container.decode(video=0))
        image: Image.Image = frame.to_image()  # type: ignore[no-untyped-call]
    image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VideoStore:
    """Videos of generation outputs in a backend, under one prefix, committed by manifest."""

    def __init__(self, backend: StorageBackend, prefix: str = "") -> None:
        self.backend = backend
        self.prefix = normalize_prefix(prefix)

    def output_key(self, asset_key: Sequence[str], partition_key: str | None) -> str:
        return output_key(self.prefix, asset_key, partition_key)

    def manifest(self, asset_key: Sequence[str], partition_key: str | None) -> Manifest | None:
        """The committed manifest of an output, or None."""
        key = f"{self.output_key(asset_key, partition_key)}/{MANIFEST_NAME}"
        raw = self.backend.get_or_none(key)
        return None if raw is None else parse_manifest(raw, self.backend.uri(key))

    def write(
        self,
        answer: VideoGenerationResponse,
        *,
        asset_key: Sequence[str],
        partition_key: str | None,
        run_id: str,
    ) -> Manifest:
        """Store the answer's videos, then commit the output's manifest (see the module doc).

        Raises:
            StorageError: the answer has no request, or the store refused a write.
            ConflictError: another writer committed this output meanwhile.
        """
        request = answer.request
        if request is None:
            raise StorageError(
                "a video answer without its request cannot be stored with its lineage; "
                "return the answer of generate_video() as it is"
            )
        asset = list(asset_key)
        partition = None if partition_key is None else str(partition_key)
        base = self.output_key(asset, partition_key)
        manifest_key = f"{base}/{MANIFEST_NAME}"
        head = self.backend.get_versioned(manifest_key)
        old = None if head is None else parse_manifest(head.data, self.backend.uri(manifest_key))
        write_id = new_write_id()
        written: list[str] = []
        try:
            records = [
                self._put_video(base, write_id, index, video, request, written)
                for index, video in enumerate(answer.videos)
            ]
            call = answer.call_info
            manifest = Manifest(
                asset_key=asset,
                partition=partition,
                partition_dimensions=partition_dimensions(partition_key),
                run_id=run_id,
                write_id=write_id,
                supersedes=[] if old is None or old.write_id is None else [old.write_id],
                created_at=_now(),
                uri=self.backend.uri(f"{base}/"),
                image_count=sum(1 for r in records if r.key),
                removed_count=sum(1 for r in records if r.removed_for_safety),
                total_bytes=sum(r.bytes for r in records),
                results=[
                    ResultRecord(
                        request=RequestRecord(engine="svd", body=request.to_wire()),
                        fingerprint=request.fingerprint(),
                        response_id=answer.response_id,
                        prediction_time_ms=answer.prediction_time_ms,
                        call_info=CallRecord(
                            attempts=call.attempts,
                            request_ids=list(call.request_ids),
                            elapsed_s=call.elapsed_s,
                            response_id=call.response_id,
                        ),
                        images=records,
                    )
                ],
            )
            self.backend.put_if(
                manifest_key,
                manifest.model_dump_json(indent=1).encode(),
                "application/json",
                {},
                None if head is None else head.version,
            )
        except BaseException:
            if written:
                self.backend.delete(written)
            raise
        if old is not None and old.object_keys():
            self.backend.delete(old.object_keys())
        return manifest

    def _put_video(
        self,
        base: str,
        write_id: str,
        index: int,
        video: GeneratedVideo,
        request: VideoGenerationRequest,
        written: list[str],
    ) -> ImageRecord:
        if not video.available:
            return ImageRecord(
                index=index,
                seed=video.seed,
                key=None,
                uri=None,
                sha256=None,
                removed_for_safety=True,
                safety_score=video.safety_score,
            )
        data = video.data
        facts = probe_mp4(data)
        key = object_key(base, write_id, f"{index:03d}-seed{video.seed}.mp4")
        metadata = {
            "seed": str(video.seed),
            "fps": f"{facts.fps:g}",
            "frames": str(facts.frames),
            "duration_s": f"{facts.duration_s:g}",
            "fingerprint": request.fingerprint(),
        }
        self.backend.put(key, data, VIDEO_CONTENT_TYPE, metadata)
        written.append(key)
        return ImageRecord(
            index=index,
            seed=video.seed,
            key=key,
            uri=self.backend.uri(key),
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            content_type=VIDEO_CONTENT_TYPE,
            format="mp4",
            width=facts.width,
            height=facts.height,
            removed_for_safety=False,
            safety_score=video.safety_score,
            metadata=metadata,
        )

    def read(self, asset_key: Sequence[str], partition_key: str | None) -> list[bytes]:
        """The MP4 bytes of an output's committed videos, in index order."""
        manifest = self.manifest(asset_key, partition_key)
        if manifest is None:
            raise StorageError(
                f"no committed videos for asset {'/'.join(asset_key)!r}"
                + ("" if partition_key is None else f" partition {partition_key!r}")
                + "; materialize it first"
            )
        return [self.backend.get(key) for key in manifest.object_keys()]

    def find_existing(
        self,
        request: VideoGenerationRequest,
        asset_key: Sequence[str],
        partition_key: str | None,
    ) -> Manifest | None:
        """The committed manifest of this output when it holds this request's videos.

        Only a request with explicit seeds can be reused (random seeds ask for new videos).
        """
        if request.explicit_seeds is None:
            return None
        manifest = self.manifest(asset_key, partition_key)
        if manifest is None or len(manifest.results) != 1:
            return None
        result = manifest.results[0]
        stored = [im.seed for im in result.images]
        if result.fingerprint != request.fingerprint() or stored != request.explicit_seeds:
            return None
        return manifest
