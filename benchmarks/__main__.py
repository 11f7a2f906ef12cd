"""The one entry point: ``python -m benchmarks [--quick] [--output DIR] [--only P1,P3] [--merge]``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from ._common import Row, Settings, machine, shared_seaweedfs
from .report import RESULTS_NAME, write_report

#: Scenario id -> module with ``run(settings) -> list[Row]``.
SCENARIOS: dict[str, str] = {
    "P1": "benchmarks.p1_client_cpu",
    "P2": "benchmarks.p2_concurrency",
    "P3": "benchmarks.p3_persist",
    "P4": "benchmarks.p4_memory",
    "P5": "benchmarks.p5_sensor",
    "P6": "benchmarks.p6_asset_overhead",
    "P7": "benchmarks.p7_ray_serve",
    "P8": "benchmarks.p8_job_store",
}
#: Scenarios a --quick run leaves out unless named with --only (P7 starts a Ray cluster).
NOT_QUICK = frozenset({"P7", "P8"})
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the dagster-octoai benchmarks and write docs/benchmarks.md.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts: a smoke run, figures meaningless"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="directory for benchmarks.md, benchmarks.png, benchmarks.json (default: docs/)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated scenario ids, e.g. P1,P3 (default: all)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the scenarios run in OUTPUT/benchmarks.json and keep the other "
        "rows (the page says which rows came from which run)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-render the page from OUTPUT/benchmarks.json without running anything",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per scenario (default 3; quick: 1)"
    )
    args = parser.parse_args(argv)
    wanted = [s.strip().upper() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        parser.error(f"--only: unknown scenario(s) {unknown}; allowed: {', '.join(SCENARIOS)}")
    args.ids = wanted or [s for s in SCENARIOS if not (args.quick and s in NOT_QUICK)]
    if args.reps is not None and args.reps < 1:
        parser.error("--reps: must be >= 1")
    if args.merge and not (args.output / RESULTS_NAME).exists():
        parser.error(f"--merge: no {args.output / RESULTS_NAME} to merge into")
    return args


def _rerender(out_dir: Path) -> int:
    data = json.loads((out_dir / RESULTS_NAME).read_text())
    page = write_report(
        [Row.from_json(r) for r in data["rows"]],
        out_dir,
        machine=data["machine"],
        command="python -m benchmarks" + (" --quick" if data["quick"] else ""),
        quick=data["quick"],
        elapsed_s=data["elapsed_s"],
        generated_at=data["generated_at"],
        merged=data.get("merged", []),
    )
    print(f"==> re-rendered {page}")
    return 0


def _merge(out_dir: Path, ids: Sequence[str], rows: list[Row], elapsed_s: float) -> int:
    """Put ``rows`` (of scenarios ``ids``) in place of those scenarios' rows in the page."""
    data = json.loads((out_dir / RESULTS_NAME).read_text())
    if data["quick"]:
        raise SystemExit("--merge: the page holds a --quick run; run everything instead")
    kept = [Row.from_json(r) for r in data["rows"] if r["id"].split("-")[0] not in ids]
    order = list(SCENARIOS)
    merged_rows = sorted([*kept, *rows], key=lambda r: order.index(r.id.split("-")[0]))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    merged = [m for m in data.get("merged", []) if not set(m["ids"]) <= set(ids)]
    merged.append({"ids": list(ids), "generated_at": when, "elapsed_s": elapsed_s})
    page = write_report(
        merged_rows,
        out_dir,
        machine=data["machine"],
        command="python -m benchmarks",
        quick=False,
        elapsed_s=data["elapsed_s"],
        generated_at=data["generated_at"],
        merged=merged,
    )
    print(f"==> merged {', '.join(ids)} into {page}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # A SIGTERM unwinds the context managers, so the server and SeaweedFS are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report_only:
        return _rerender(args.output)
    settings = Settings(quick=args.quick, reps=args.reps or (1 if args.quick else 3))
    # Dagster's per-event INFO lines would bury the progress lines.
    logging.getLogger("dagster").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        if {"P3", "P4", "P6"} & set(args.ids):
            stack.enter_context(shared_seaweedfs())
        for sid in args.ids:
            rows.extend(_run_one(sid, settings))
    if args.merge:
        if args.quick:
            raise SystemExit("--merge: a --quick run's figures mean nothing; run without --quick")
        return _merge(args.output, args.ids, rows, time.perf_counter() - started)
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    page = write_report(
        rows,
        args.output,
        machine=machine(),
        command=command,
        quick=args.quick,
        elapsed_s=time.perf_counter() - started,
    )
    print(f"==> wrote {page}")
    return 0


def _run_one(sid: str, settings: Settings) -> list[Row]:
    run: Callable[[Settings], list[Row]] = importlib.import_module(SCENARIOS[sid]).run
    t0 = time.perf_counter()
    print(f"==> {sid} ...", flush=True)
    produced = run(settings)
    for row in produced:
        verdict = {True: "pass", False: "MISS", None: "-"}[row.passed]
        target = "none" if row.target is None else f"{row.comparison} {row.target}"
        print(
            f"    {row.id}: {row.median:.3g} {row.unit} (min {row.low:.3g}, "
            f"max {row.high:.3g}) target {target} -> {verdict}",
            flush=True,
        )
    print(f"    {sid} took {time.perf_counter() - t0:.0f} s", flush=True)
    return produced


if __name__ == "__main__":
    sys.exit(main())
