"""Writers of one output in child processes: killed at a chosen step, or racing each other.

A child is forked from a ``forkserver`` that imported the store once. It builds its own
:class:`ImageStore` on SeaweedFS or a local directory (described by a plain dict, so it
pickles), writes one output, and either dies by SIGKILL just before its ``kill_at``-th
mutating call to the backend (no clean-up, no ``finally``), or meets the other writers
at a barrier just before committing, so that they all commit on the same stale read.
"""

from __future__ import annotations

import base64
import io
import json
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from dagster_octoai.api.models import (
    GeneratedImage,
    ImageGenerationRequest,
    ImageGenerationResponse,
)
from dagster_octoai.storage import ImageStore, LocalBackend, S3Backend, StorageBackend

#: The backend calls that change what is stored: the steps of the protocol.
MUTATING = ("put", "copy", "put_if", "delete", "delete_if")

_PRELOAD = ["boto3", "botocore.session", "PIL.Image", "dagster_octoai.storage", "_store_children"]
_context: Any = None


def mp() -> Any:
    """The fork server's multiprocessing context (started on first use)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def picture(seed: int) -> bytes:
    """A small JPEG whose pixels depend on the seed."""
    im = Image.new("RGB", (48, 48), ((seed * 53) % 256, (seed * 29) % 256, (seed * 71) % 256))
    for x in range(0, 48, 6):
        im.putpixel((x, (seed * 7 + x) % 48), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def answer(prompt: str, seeds: list[int], offset: int = 0) -> ImageGenerationResponse:
    """An answer of explicit seeds whose bytes are ``picture(seed + offset)``."""
    request = ImageGenerationRequest(
        prompt=prompt, engine="sd", num_images=len(seeds), seed=list(seeds)
    )
    return ImageGenerationResponse(
        images=[
            GeneratedImage(image_b64=base64.b64encode(picture(s + offset)).decode(), seed=s)
            for s in seeds
        ],
        request=request,
    )


def backend_of(place: dict[str, Any]) -> StorageBackend:
    """The backend a place describes: ``{"base_dir": ...}`` or SeaweedFS's address and bucket."""
    if "base_dir" in place:
        return LocalBackend(place["base_dir"])
    return S3Backend.from_config(
        place["bucket"],
        endpoint_url=place["endpoint_url"],
        region_name=place["region"],
        aws_access_key_id=place["access_key"],
        aws_secret_access_key=place["secret_key"],
        addressing_style="path",
    )


def store_of(place: dict[str, Any]) -> ImageStore:
    return ImageStore(backend_of(place), prefix="gen", max_concurrency=2)


def die_before(backend: StorageBackend, step: int) -> None:
    """SIGKILL this process just before the ``step``-th mutating call (1-based)."""
    lock = threading.Lock()
    count = [0]
    for name in MUTATING:
        original = getattr(backend, name)

        def wrapper(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                count[0] += 1
                fatal = count[0] == step
            if fatal:
                os.kill(os.getpid(), signal.SIGKILL)
            return _original(*args, **kwargs)

        setattr(backend, name, wrapper)


def meet_before_commit(backend: StorageBackend, barrier: Any) -> None:
    """Make the first commit of this process wait at ``barrier`` until every writer is there."""
    original = backend.put_if
    met = [False]

    def put_if(*args: Any, **kwargs: Any) -> str:
        if not met[0]:
            met[0] = True
            barrier.wait(timeout=120)
        return original(*args, **kwargs)

    backend.put_if = put_if  # type: ignore[method-assign]


def killed_write(place: dict[str, Any], step: int) -> None:
    """The second write of output ``fox``: one image kept, two new; dies before ``step``."""
    store = store_of(place)
    die_before(store.backend, step)
    store.write(
        [answer("a fox", [1, 2]), answer("an owl", [3], offset=50)],
        asset_key=["fox"],
        partition_key="p1",
        run_id="killed",
    )


def racing_write(place: dict[str, Any], writer: int, same: bool, barrier: Any, out: str) -> None:
    """One of N writers of output ``fox``; writes what it stored as JSON to ``out``."""
    store = store_of(place)
    meet_before_commit(store.backend, barrier)
    offset = 0 if same else 100 * (writer + 1)
    report = store.write(
        [answer("a fox", [1, 2], offset=offset)],
        asset_key=["fox"],
        partition_key="p1",
        run_id=f"writer-{writer}",
    )
    Path(out).write_text(
        json.dumps({"offset": offset, "write_id": report.write_id, "seeds": report.seeds})
    )


def run_children(target: Any, argsets: list[tuple[Any, ...]], timeout: float = 180) -> list[int]:
    """Run ``target(*args)`` for each argument tuple in its own child, all at once; exit codes."""
    ctx = mp()
    procs = [ctx.Process(target=target, args=args, daemon=True) for args in argsets]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    codes = []
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
            proc.join(10)
        codes.append(proc.exitcode if proc.exitcode is not None else -999)
    return codes
