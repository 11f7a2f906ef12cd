"""The clients' video calls (``POST /generate/svd``): sync, async, submit and wait.

Mixed into :class:`~dagster_octoai.api.client.OctoAIClient` and
:class:`~dagster_octoai.api.client.AsyncOctoAIClient`: the same connection pool, retry
policy, deadlines, trusted origins and token redaction as their image calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import httpx
from pydantic import ValidationError

from ._http import Call, CallKind, Redactor, _format_error, json_object, parse_poll
from ._retry import HTTPRetryPolicy
from .errors import RequestValidationError
from .models import ASYNC_BODY_LIMIT_BYTES, PollResult
from .video import SVD_ENGINE, VideoGenerationRequest, VideoGenerationResponse, VideoJob

if TYPE_CHECKING:
    from .client import _JobWait

__all__ = ["AsyncVideoCalls", "VideoCalls", "VideoRequestLike", "parse_video"]

logger = logging.getLogger("dagster_octoai.api.client")

VideoRequestLike: TypeAlias = VideoGenerationRequest | Mapping[str, Any]


def parse_video(
    response: httpx.Response, where: str, redactor: Redactor, response_id: str | None = None
) -> VideoGenerationResponse:
    """A video generation body, held to what OctoAI's OpenAPI requires of it."""
    body = json_object(response, where, redactor, response_id)

    def bad(problem: str) -> Exception:
        return _format_error(response, where, problem, redactor, response_id)

    if "prediction_time_ms" not in body:
        raise bad("the video answer lacks 'prediction_time_ms'")
    videos = body.get("videos")
    if not isinstance(videos, list):
        raise bad("the video answer lacks a 'videos' list")
    for i, video in enumerate(videos):
        if not isinstance(video, dict):
            raise bad(f"videos[{i}] is not an object")
        for key in ("seed", "removed_for_safety"):
            if key not in video:
                raise bad(f"videos[{i}] lacks {key!r}")
        if video.get("video") is None and video.get("removed_for_safety") is not True:
            raise bad(f"videos[{i}] has no video but is not marked removed_for_safety")
    try:
        return VideoGenerationResponse.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise bad(f"the video answer does not match the API ({problems})") from None


def _build(request: VideoRequestLike) -> VideoGenerationRequest:
    return VideoGenerationRequest.build(request)


def _async_body(request: VideoGenerationRequest) -> bytes:
    body = request.wire_bytes()
    if len(body) > ASYNC_BODY_LIMIT_BYTES:
        mb = len(body) / 1024 / 1024
        raise RequestValidationError(
            f"image: the JSON body is {mb:.1f} MB, over the 10 MB limit of async requests; "
            "use a smaller or JPEG image, or the sync generate_video()",
            [{"field": "image", "message": f"body {mb:.1f} MB > 10 MB async limit"}],
        )
    return body


def _job_wait(job: VideoJob, timeout: float, interval: float, max_interval: float) -> _JobWait:
    from .client import _JobWait

    # _JobWait reads only the job's response_id.
    wait: _JobWait = _JobWait(job, timeout, interval, max_interval)  # type: ignore[arg-type]
    return wait


def _log(where: str, answer: VideoGenerationResponse) -> None:
    call = answer.call_info
    logger.info(
        "%s: %d video(s), %.0f ms prediction, %d attempt(s), %.2f s",
        where,
        len(answer.videos),
        answer.prediction_time_ms,
        call.attempts,
        call.elapsed_s,
    )


class _VideoBase:
    """What both mixins need of the client (declared for the type checker)."""

    if TYPE_CHECKING:
        _base_url: str
        _redactor: Redactor

        def _call(
            self,
            method: str,
            url: str,
            kind: CallKind,
            *,
            deadline: float | None = None,
            response_id: str | None = None,
            retry: HTTPRetryPolicy | None = None,
            timeout: httpx.Timeout | None = None,
        ) -> Call: ...

        def _trusted_url(self, url: str, what: str, response_id: str | None) -> str: ...

        def _completed_url(self, result: PollResult, response_id: str | None) -> str | None: ...

    def _video_url(self) -> str:
        return f"{self._base_url}/generate/{SVD_ENGINE}"

    def _video_job(
        self, response: httpx.Response, where: str, req: VideoGenerationRequest
    ) -> VideoJob:
        body = json_object(response, where, self._redactor)
        response_id, poll_url = body.get("response_id"), body.get("poll_url")
        if not isinstance(response_id, str) or not response_id:
            raise _format_error(
                response, where, "the async answer lacks 'response_id'", self._redactor, None
            )
        if not isinstance(poll_url, str) or not poll_url:
            raise _format_error(
                response, where, "the async answer lacks 'poll_url'", self._redactor, response_id
            )
        return VideoJob(response_id=response_id, poll_url=poll_url, request=req)


class VideoCalls(_VideoBase):
    """The sync client's video calls."""

    if TYPE_CHECKING:
        _send: Callable[..., httpx.Response]

    def generate_video(self, request: VideoRequestLike) -> VideoGenerationResponse:
        """Animate an image and wait for the videos (``POST /generate/svd``).

        Args:
            request: A :class:`~dagster_octoai.api.video.VideoGenerationRequest` or a dict
                with its keys (``image`` may be a PIL image, bytes, a path or base64).

        Returns:
            The answer; its ``request`` is the validated request sent, each video's
            ``data`` the MP4 bytes.

        Raises:
            RequestValidationError: the request breaks a rule; nothing was sent.
            APIStatusError: the server refused it (e.g. 404: it serves no ``svd``).
        """
        req = _build(request)
        call = self._call("POST", self._video_url(), "generate")
        response = self._send(call, content=req.wire_bytes())
        answer = parse_video(response, call.where, self._redactor)._attach(req, call=call.info())
        _log(call.where, answer)
        return answer

    def submit_video(self, request: VideoRequestLike) -> VideoJob:
        """Start an async video job (``X-OctoAI-Async: 1``); returns the job to wait for."""
        req = _build(request)
        body = _async_body(req)
        call = self._call("POST", self._video_url(), "submit")
        response = self._send(call, content=body, async_=True)
        job = self._video_job(response, call.where, req)
        logger.info("%s: submitted async video job %s", call.where, job.response_id)
        return job

    def wait_video(
        self,
        job: VideoJob,
        *,
        timeout: float = 600.0,
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 10.0,
    ) -> VideoGenerationResponse:
        """Poll a video job until it completes, then fetch it (as :meth:`wait` for images)."""
        wait = _job_wait(job, timeout, poll_interval_s, max_poll_interval_s)
        rid = job.response_id
        poll_url = self._trusted_url(job.poll_url, "poll_url of async job", rid)
        while True:
            call = self._call("GET", poll_url, "poll", deadline=wait.deadline, response_id=rid)
            result = parse_poll(self._send(call), call.where, self._redactor, rid)
            url = self._completed_url(result, rid)
            if url is not None:
                fetch = self._call("GET", url, "fetch", deadline=wait.deadline, response_id=rid)
                response = self._send(fetch)
                answer = parse_video(response, fetch.where, self._redactor, rid)._attach(
                    job.request, response_id=rid, call=fetch.info()
                )
                _log(f"job {rid}", answer)
                return answer
            time.sleep(wait.pause(result))
            wait.check(result)


class AsyncVideoCalls(_VideoBase):
    """The async client's video calls."""

    if TYPE_CHECKING:
        _send: Callable[..., Awaitable[httpx.Response]]

    async def generate_video(self, request: VideoRequestLike) -> VideoGenerationResponse:
        """Animate an image and wait for the videos; see :meth:`OctoAIClient.generate_video`."""
        req = _build(request)
        call = self._call("POST", self._video_url(), "generate")
        response = await self._send(call, content=req.wire_bytes())
        answer = parse_video(response, call.where, self._redactor)._attach(req, call=call.info())
        _log(call.where, answer)
        return answer

    async def submit_video(self, request: VideoRequestLike) -> VideoJob:
        """Start an async video job; see :meth:`OctoAIClient.submit_video`."""
        req = _build(request)
        body = _async_body(req)
        call = self._call("POST", self._video_url(), "submit")
        response = await self._send(call, content=body, async_=True)
        job = self._video_job(response, call.where, req)
        logger.info("%s: submitted async video job %s", call.where, job.response_id)
        return job

    async def wait_video(
        self,
        job: VideoJob,
        *,
        timeout: float = 600.0,
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 10.0,
    ) -> VideoGenerationResponse:
        """Poll until completed, then fetch; see :meth:`OctoAIClient.wait_video`."""
        wait = _job_wait(job, timeout, poll_interval_s, max_poll_interval_s)
        rid = job.response_id
        poll_url = self._trusted_url(job.poll_url, "poll_url of async job", rid)
        while True:
            call = self._call("GET", poll_url, "poll", deadline=wait.deadline, response_id=rid)
            result = parse_poll(await self._send(call), call.where, self._redactor, rid)
            url = self._completed_url(result, rid)
            if url is not None:
                fetch = self._call("GET", url, "fetch", deadline=wait.deadline, response_id=rid)
                response = await self._send(fetch)
                answer = parse_video(response, fetch.where, self._redactor, rid)._attach(
                    job.request, response_id=rid, call=fetch.info()
                )
                _log(f"job {rid}", answer)
                return answer
            await asyncio.sleep(wait.pause(result))
            wait.check(result)
