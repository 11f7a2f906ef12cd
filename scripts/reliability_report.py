"""Run the reliability suite and rewrite docs/reliability.md with the figures it measured.

Usage (from the repository root; ``make reliability`` runs this)::

    .venv/bin/python scripts/reliability_report.py

Every figure in the table comes from this run: the tests record what they measured
(images requested and persisted, duplicates found in S3, paid generations from the
server's request log, retried failures, leaks found by the token scanner) into a JSON
file named by ``DAGSTER_OCTOAI_RELIABILITY_FIGURES``. The page is written only when
every test passed, so it never shows figures of a failing run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
FIGURES_ENV = "DAGSTER_OCTOAI_RELIABILITY_FIGURES"

COLUMNS = (
    ("images_requested", "Images requested"),
    ("images_persisted", "Persisted"),
    ("duplicates_in_s3", "Duplicates in S3"),
    ("paid_generations", "Paid generations"),
    ("retried_failures", "Retried failures"),
    ("leaks_found", "Token leaks found"),
)

INTRO = """# Reliability

What the reliability suite (`tests/reliability/`) proves, with the figures of its last
run. Everything runs for real on this machine: the local OctoAI-compatible server with
seeded fault injection over loopback HTTP, SeaweedFS as S3, real Dagster runs. Every
scenario uses the recognisable token `sk-LEAKCHECK-…`, and the token scanner
(`devtools.secrets.TokenScanner`) looks for it, plain and encoded, in the
captured logs (DEBUG and up), exceptions, the Dagster event log of every run, the
materialization metadata, the S3 objects with their user metadata, manifests and the
job ledger.

Regenerate this page with `make reliability` (it runs
`python scripts/reliability_report.py`, which runs the suite and rewrites the table).

## What the scenarios do

- **Transient faults**: 1,000 images (4 partitions x 25 requests x 10 images; `make test`
  runs the same 100 requests with 4 images each), once
  through a partitioned sync asset and once through async jobs, with 20 % of requests
  answered 429 with `Retry-After`, 500, 503, a dropped connection (before or after the
  images were rendered) or a slow answer, from a seeded fault draw.
- **Run process killed**: an async blocking asset's process is SIGKILLed after a
  submit, mid-poll, mid-fetch, mid-upload or before the manifest, then run again.
- **Sensor killed**: a process ticking the async sensor as `dagster-daemon` does
  (evaluate, add the dynamic partitions, save the cursor, launch each run unless its
  `run_key` exists) is SIGKILLed mid-poll, after a job was recorded completed, before
  the cursor was saved, before the runs were launched, mid-upload in a persist run, or
  after the IO manager stored a persist run's output but before the ledger was told.
  The dead run is marked failed (as Dagster's run monitoring does) and fresh ticks
  resume from the last saved cursor. Every job's partition is materialized once.
- **Postgres**: the suite starts its own PostgreSQL cluster (`initdb` in a temp dir,
  installed with `apt-get` first when missing and running as root; the tests skip with
  a loud reason only where it can be neither found nor installed) and runs the async
  sensor's ticks and persist runs, and an image job under the multiprocess executor,
  on a Dagster instance whose run, event and schedule storage is `dagster-postgres`.
- **Races and kills at the commit points**: sensor evaluations and runs racing to
  (re)submit one job (each reads the job's record, then waits until every racer has read
  it, so the race is certain), an image write SIGKILLed before each step of the commit
  protocol, and concurrent writers of one image output.
- **S3 faults**, **bad input** and **corrupt answers**: see the rows' names.

"""

NOTES = """
## How to read the table

- **Paid generations** is the server's count of rendered images. Above the images
  persisted it counts only answers the server rendered and then lost with the
  connection (`drop_after_render` faults, and async submissions whose acceptance was
  lost): the tests assert `paid == persisted + paid for lost answers` exactly.
  The OctoAI API has no idempotency key, so a lost answer can only be paid again.
- **Retried failures** counts failed HTTP attempts that were retried (429 with
  Retry-After, 500, 503, dropped connections), plus resubmitted async jobs.
- **Duplicates in S3** counts image objects with the same bytes or the same seed as
  another one under the scenario's prefix, after the store's clean-up removed what
  killed or failed writes left (`orphans removed by clean up`: those objects, under
  their own write ids and listed by no manifest).
- A dash means the figure does not apply to the scenario.

## Known limits

- The sensor-kill tests emulate the daemon's loop (the cursor lives in a file instead
  of the instance's instigator state, runs execute in the ticking process) and mark a
  killed run failed themselves, as Dagster's run monitoring would; without run
  monitoring a killed persist run stays `STARTED` and the sensor waits for it.
- The async variant's paid count excludes lost submissions whose job then failed on
  the server (nothing was rendered for them); the test asks the server which those are.

- A missing bucket, refused or read-only S3 credentials, a store that ignores
  conditional writes and keys over 1,024 bytes are refused by the preflight before
  anything is paid (0 paid generations in those rows), for random seeds too. A store
  that starts refusing writes after the preflight (an outage) still fails the output
  after its images were paid for.
- The published OpenAPI schemas express cross-field rules with `allOf`/`anyOf`,
  which schemathesis cannot generate from; the fuzz test drops those blocks so
  schemathesis sends bodies that are valid field by field, and checks that the
  server answers them with a 422, never a 5xx.
"""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(figures: dict[str, dict[str, Any]], *, duration_s: float, outcome: str) -> str:
    """The Markdown page for a set of figures."""
    lines = [INTRO, "## Figures", ""]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"Last run: {stamp}, {outcome}, {duration_s:.0f} s.")
    lines.append("")
    lines.append("| Scenario | " + " | ".join(title for _, title in COLUMNS) + " | Other figures |")
    lines.append("|---|" + "---:|" * len(COLUMNS) + "---|")
    known = {key for key, _ in COLUMNS}
    for scenario in sorted(figures):
        row = figures[scenario]
        cells = [_cell(row.get(key)) for key, _ in COLUMNS]
        other = ", ".join(
            f"{key.replace('_', ' ')}: {_cell(value)}"
            for key, value in sorted(row.items())
            if key not in known
        )
        lines.append(f"| {scenario} | " + " | ".join(cells) + f" | {other or '-'} |")
    lines.append(NOTES)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run the suite, then write the page (only when every test passed)."""
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        target = Path(tmp) / "figures.json"
        env = {**os.environ, FIGURES_ENV: str(target)}
        started = time.monotonic()
        command = [
            sys.executable,
            "-m",
            "pytest",
            "tests/reliability",
            "-q",
            "-p",
            "no:cacheprovider",
            *argv,
        ]
        print("==> " + " ".join(command), flush=True)
        code = subprocess.call(command, cwd=ROOT, env=env)
        duration = time.monotonic() - started
        if code != 0:
            print(
                f"the reliability suite failed (exit {code}); {DOC} left as it was", file=sys.stderr
            )
            return code
        figures = json.loads(target.read_text()) if target.exists() else {}
    if not figures:
        print("the suite recorded no figures; nothing written", file=sys.stderr)
        return 1
    DOC.write_text(render(figures, duration_s=duration, outcome="all tests passed"))
    print(f"==> wrote {DOC.relative_to(ROOT)} ({len(figures)} scenarios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
