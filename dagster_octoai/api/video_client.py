"""The clients' video calls (``POST /generate/svd``): sync, async, submit, fetch and wait.

Mixed into :class:`~dagster_octoai.api.client.OctoAIClient` and
:class:`~dagster_octoai.api.client.AsyncOctoAIClient`: the same connection pool, retry
policy, deadlines, trusted origins and token redaction as their image calls, and the same
polling (:class:`~dagster_octoai.api._wait._JobWait`: back-off, deadline, a restarting
server ridden out). Each call is built and its answer read by :class:`_VideoBase`; the two
mixins only send (blocking or awaited).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import httpx

from ._http import Call, CallKind, Redactor, parse_answer, parse_job_ids
from ._retry import HTTPRetryPolicy
from ._wait import AnyJob, _JobWait, _not_ready
from .errors import ConnectionFailedError, RequestValidationError, ServerError
from .models import ASYNC_BODY_LIMIT_BYTES, PollResult
from .video import SVD_ENGINE, VideoGenerationRequest, VideoGenerationResponse, VideoJob

__all__ = ["AsyncVideoCalls", "VideoCalls", "VideoRequestLike", "parse_video"]

logger = logging.getLogger("dagster_octoai.api.client")

VideoRequestLike: TypeAlias = VideoGenerationRequest | Mapping[str, Any]


def parse_video(
    response: httpx.Response, where: str, redactor: Redactor, response_id: str | None = None
) -> VideoGenerationResponse:
    """A video generation body, held to what OctoAI's OpenAPI requires of it."""
    return parse_answer(
        response, where, redactor, response_id, VideoGenerationResponse, "videos", "video"
    )


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
    """Building the video calls and reading their answers: all but the sending."""

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

        def _completed_url(self, result: PollResult, response_id: str | None) -> str | None: ...

    def _generate_call(self, request: VideoRequestLike) -> tuple[VideoGenerationRequest, Call]:
        return VideoGenerationRequest.build(request), self._call(
            "POST", f"{self._base_url}/generate/{SVD_ENGINE}", "generate"
        )

    def _submit_call(self, request: VideoRequestLike) -> tuple[VideoGenerationRequest, bytes, Call]:
        req = VideoGenerationRequest.build(request)
        body = _async_body(req)  # before the call is made: nothing is sent
        return req, body, self._call("POST", f"{self._base_url}/generate/{SVD_ENGINE}", "submit")

    def _answer(
        self,
        response: httpx.Response,
        call: Call,
        request: VideoGenerationRequest,
        response_id: str | None = None,
    ) -> VideoGenerationResponse:
        answer = parse_video(response, call.where, self._redactor, response_id)._attach(
            request, response_id=response_id, call=call.info()
        )
        _log(call.where if response_id is None else f"job {response_id}", answer)
        return answer

    def _job(
        self, response: httpx.Response, call: Call, request: VideoGenerationRequest
    ) -> VideoJob:
        rid, poll_url = parse_job_ids(response, call.where, self._redactor, self._base_url)
        logger.info("%s: submitted async video job %s", call.where, rid)
        return VideoJob(response_id=rid, poll_url=poll_url, request=request)

    def _fetch_call(self, job: VideoJob, url: str, deadline: float | None) -> Call:
        return self._call("GET", url, "fetch", deadline=deadline, response_id=job.response_id)

    def _ready_url(self, job: VideoJob, result: PollResult) -> str:
        url = self._completed_url(result, job.response_id)
        if url is None:
            raise _not_ready(job, result)
        return url


def _video_job(job: VideoJob) -> VideoJob:
    if not isinstance(job, VideoJob):
        raise TypeError(
            f"job: expected the VideoJob of submit_video(), got {type(job).__name__}; "
            "image jobs are waited for with wait()"
        )
    return job


class VideoCalls(_VideoBase):
    """The sync client's video calls."""

    if TYPE_CHECKING:
        _send: Callable[..., httpx.Response]

        def _poll(self, job: AnyJob | str, deadline: float | None) -> PollResult: ...

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
        req, call = self._generate_call(request)
        return self._answer(self._send(call, content=req.wire_bytes()), call, req)

    def submit_video(
        self, request: VideoRequestLike, *, idempotency_key: str | None = None
    ) -> VideoJob:
        """Start an async video job (``X-OctoAI-Async: 1``); returns the job to wait for.

        ``idempotency_key``: as for :meth:`submit`, a repeat of the same key and body is
        answered with the first job, unpaid.
        """
        req, body, call = self._submit_call(request)
        response = self._send(call, content=body, async_=True, idempotency_key=idempotency_key)
        return self._job(response, call, req)

    def fetch_video(self, job: VideoJob) -> VideoGenerationResponse:
        """The videos of a completed job (one poll for its ``response_url``, then the fetch).

        Raises:
            JobNotReadyError: the job is not completed yet.
            JobExpiredError, JobFailedError: as :meth:`fetch`.
        """
        job = _video_job(job)
        url = self._ready_url(job, self._poll(job, None))
        call = self._fetch_call(job, url, None)
        return self._answer(self._send(call), call, job.request, job.response_id)

    def wait_video(
        self,
        job: VideoJob,
        *,
        timeout: float = 600.0,
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 10.0,
    ) -> VideoGenerationResponse:
        """Poll a video job until it completes, then fetch it (as :meth:`wait` for images)."""
        job = _video_job(job)
        wait = _JobWait(job, timeout, poll_interval_s, max_poll_interval_s)
        while True:
            try:
                result = self._poll(job, wait.deadline)
                url = self._completed_url(result, job.response_id)
                if url is not None:
                    call = self._fetch_call(job, url, wait.deadline)
                    return self._answer(self._send(call), call, job.request, job.response_id)
            except (ConnectionFailedError, ServerError) as exc:
                time.sleep(wait.outage(exc))
                wait.check(None)
                continue
            time.sleep(wait.pause(result))
            wait.check(result)


class AsyncVideoCalls(_VideoBase):
    """The async client's video calls."""

    if TYPE_CHECKING:
        _send: Callable[..., Awaitable[httpx.Response]]

        async def _poll(self, job: AnyJob | str, deadline: float | None) -> PollResult: ...

    async def generate_video(self, request: VideoRequestLike) -> VideoGenerationResponse:
        """Animate an image and wait for the videos; see :meth:`OctoAIClient.generate_video`."""
        req, call = self._generate_call(request)
        return self._answer(await self._send(call, content=req.wire_bytes()), call, req)

    async def submit_video(
        self, request: VideoRequestLike, *, idempotency_key: str | None = None
    ) -> VideoJob:
        """Start an async video job; see :meth:`OctoAIClient.submit_video`."""
        req, body, call = self._submit_call(request)
        response = await self._send(
            call, content=body, async_=True, idempotency_key=idempotency_key
        )
        return self._job(response, call, req)

    async def fetch_video(self, job: VideoJob) -> VideoGenerationResponse:
        """The videos of a completed job; see :meth:`OctoAIClient.fetch_video`."""
        job = _video_job(job)
        url = self._ready_url(job, await self._poll(job, None))
        call = self._fetch_call(job, url, None)
        return self._answer(await self._send(call), call, job.request, job.response_id)

    async def wait_video(
        self,
        job: VideoJob,
        *,
        timeout: float = 600.0,
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 10.0,
    ) -> VideoGenerationResponse:
        """Poll until completed, then fetch; see :meth:`OctoAIClient.wait_video`."""
        job = _video_job(job)
        wait = _JobWait(job, timeout, poll_interval_s, max_poll_interval_s)
        while True:
            try:
                result = await self._poll(job, wait.deadline)
                url = self._completed_url(result, job.response_id)
                if url is not None:
                    call = self._fetch_call(job, url, wait.deadline)
                    response = await self._send(call)
                    return self._answer(response, call, job.request, job.response_id)
            except (ConnectionFailedError, ServerError) as exc:
                await asyncio.sleep(wait.outage(exc))
                wait.check(None)
                continue
            await asyncio.sleep(wait.pause(result))
            wait.check(result)
