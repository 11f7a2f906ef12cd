"""The benchmarks run end to end in --quick mode: every scenario gives a row, a figure, a plot.

Nothing about time is asserted (speed targets live in benchmarks/, see docs/benchmarks.md);
this only proves the harness works against the real local server and SeaweedFS.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("P1", "P2", "P3", "P4", "P5", "P6")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_writes_a_row_and_a_figure_per_scenario(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["quick"] is True
    rows = data["rows"]
    ids = [r["id"] for r in rows]
    for sid in SCENARIOS:
        assert sid in ids, f"no row for {sid}: {ids}"
    for row in rows:
        assert row["samples"], row["id"]
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in row["samples"])
        assert row["min"] <= row["median"] <= row["max"]
        assert row["figure"] and row["unit"]
        # Only an informational row (e.g. P6-assets) has no target, and so no verdict.
        assert row["target"] is not None or row["passed"] is None, row["id"]
        # The non-timing checks are real even at small counts.
        assert all(row["checks"].values()), (row["id"], row["checks"])

    page = (tmp_path / "benchmarks.md").read_text()
    for sid in SCENARIOS:
        assert f"| {sid} |" in page
    assert "![benchmark figures](benchmarks.png)" in page

    with Image.open(tmp_path / "benchmarks.png") as plot:
        assert plot.format == "PNG"
        # One panel of 46 px per row under a 24 px legend and two 12 px margins.
        assert plot.height == 2 * 12 + 24 + 46 * len(rows)


def test_merge_replaces_only_the_scenarios_run_and_the_page_says_when(tmp_path: Path) -> None:
    from benchmarks.__main__ import _merge
    from benchmarks._common import Row
    from benchmarks.report import write_report

    def row(sid: str, value: float) -> Row:
        return Row(
            id=sid, scenario="s", baseline="-", figure="f", unit="x", samples=[value], target=1.0
        )

    machine = {"cpus": 2, "processor": "x86_64", "platform": "Linux", "python": "3.11"}
    write_report(
        [row("P1", 0.5), row("P1-sdk", 0.6), row("P8", 0.1)],
        tmp_path,
        machine=machine,
        command="python -m benchmarks",
        quick=False,
        elapsed_s=60,
    )
    _merge(tmp_path, ["P8"], [row("P8", 0.9), row("P8", 0.8)], elapsed_s=120)
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert [(r["id"], r["samples"]) for r in data["rows"]] == [
        ("P1", [0.5]),
        ("P1-sdk", [0.6]),
        ("P8", [0.9]),
        ("P8", [0.8]),
    ]
    page = (tmp_path / "benchmarks.md").read_text()
    assert "in 1.0 minutes. The rows of P8 come from a later run" in page
    assert "--only P8 --merge` on " in page and "in 2.0 minutes." in page
