"""The run process SIGKILLed at five points, then run again: nothing lost, nothing doubled.

Each case runs ``_crash_driver.py`` (an ``octoai_async_blocking_asset`` of 4 jobs x 2
images writing to SeaweedFS through a job ledger, on a persistent Dagster instance) in
a child process that kills itself at a deterministic point, then runs it again to the
end, then once more to show that a re-run reuses what was persisted. The children
are forked from the suite's fork server (``_children.py``), which imported Dagster once.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.storage.backends import LocalBackend
from dagster_octoai.storage.ledger import JobLedger, JobState
from dagster_octoai.testing.seaweedfs import SeaweedFS
from devtools.secrets import TokenScanner

from ._children import run_child
from ._crash_driver import run_case
from ._support import LEAK_TOKEN, Figures, stored_once

JOBS, IMAGES_PER_JOB = 4, 2
TOTAL = JOBS * IMAGES_PER_JOB

POINTS = {
    "after_submit": "after_submit:2",
    "mid_poll": "mid_poll:3",
    "mid_fetch": "mid_fetch:2",
    "mid_upload": "mid_upload:5",
    "before_manifest": "before_manifest",
}


@dataclass
class Outcome:
    """How a child ended, what it printed and logged, and its result (if it finished)."""

    code: int
    log: str
    result: dict[str, Any] | None


def _run(env: dict[str, str], crash_at: str | None, workdir: Path, name: str) -> Outcome:
    log_path, result_path = workdir / f"{name}.log", workdir / f"{name}.json"
    code = run_child(run_case, env, crash_at, str(log_path), str(result_path), timeout=240)
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return Outcome(code, log, result)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("point", list(POINTS))
def test_killed_run_resumes_without_losing_or_doubling_images(
    point: str,
    seaweedfs: SeaweedFS,
    bucket: str,
    dagster_home: Path,
    tmp_path: Path,
    scanner: TokenScanner,
    figures: Figures,
) -> None:
    ledger_dir = tmp_path / "ledger"
    with LocalOctoAIServer(ServerConfig(token=LEAK_TOKEN)) as server:
        env = {
            "DAGSTER_HOME": str(dagster_home),
            "OCTOAI_TOKEN": LEAK_TOKEN,
            "OCTOAI_URL": server.url,
            "LEDGER_DIR": str(ledger_dir),
            "S3_BUCKET": bucket,
            "S3_ENDPOINT": seaweedfs.endpoint_url,
            "S3_KEY": seaweedfs.access_key,
            "S3_SECRET": seaweedfs.secret_key,
        }
        crashed = _run(env, POINTS[point], tmp_path, "crashed")
        assert crashed.code == -signal.SIGKILL, crashed.log[-3000:]
        paid_at_crash = server.stats()["paid_generations"]

        resumed = _run(env, None, tmp_path, "resumed")
        assert resumed.code == 0, resumed.log[-3000:]
        paid_after_resume = server.stats()["paid_generations"]

        # One point is enough to show a re-run reusing what was persisted (each run is a
        # fresh Python process: seconds on a busy 2-core box).
        rerun = _run(env, None, tmp_path, "rerun") if point == "mid_upload" else None
        if rerun is not None:
            assert rerun.code == 0, rerun.log[-3000:]
        paid_after_rerun = server.stats()["paid_generations"]

    client = seaweedfs.client()
    inv = stored_once(client, bucket, images=TOTAL, manifests=1)
    records = list(JobLedger(LocalBackend(ledger_dir)).iter_records())
    assert len(records) == JOBS and {r.state for r in records} == {JobState.PERSISTED}
    # The resumed run picked up the jobs the crashed one had submitted.
    assert resumed.result is not None and resumed.result["resumed"] >= 1
    if rerun is not None:
        # Re-running pays nothing: every job is resumed from the ledger.
        assert rerun.result is not None and rerun.result["resumed"] == JOBS
    assert paid_after_rerun == paid_after_resume
    # Nothing is paid twice, not even a job the service accepted whose id the killed
    # process never recorded ("after_submit"): the resumed run submits it again under the
    # ledger's Idempotency-Key and the server answers with the first job.
    assert paid_after_resume == TOTAL, (paid_at_crash, paid_after_resume)

    leaks = scanner.scan_files(dagster_home) + scanner.scan_files(ledger_dir)
    for proc in (p for p in (crashed, resumed, rerun) if p is not None):
        leaks += scanner.scan_text(proc.log, f"driver output ({point})")
    s3_leaks, _ = scanner.scan_s3(client, bucket)
    assert leaks == [] and s3_leaks == []
    figures.record(
        f"Run process SIGKILLed {point.replace('_', ' ')}, then resumed"
        + (", re-run" if rerun else ""),
        images_requested=TOTAL,
        images_persisted=len(inv.images),
        duplicates_in_s3=inv.duplicate_contents,
        paid_generations=paid_after_rerun,
        paid_for_lost_answers=paid_after_resume - TOTAL,
        orphans_removed_by_clean_up=inv.orphans_removed,
        leaks_found=len(leaks) + len(s3_leaks),
    )
