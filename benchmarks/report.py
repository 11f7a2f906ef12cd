"""The results page: a Markdown table, a PNG plot (Pillow), the findings, the raw JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ._common import Row

__all__ = ["PLOT_NAME", "RESULTS_NAME", "write_report"]

PAGE_NAME = "benchmarks.md"
PLOT_NAME = "benchmarks.png"
RESULTS_NAME = "benchmarks.json"
FINDINGS = Path(__file__).with_name("findings.md")

_PANEL_H = 46
_LABEL_W = 150
_PLOT_W = 560
_MARGIN = 12


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _verdict(row: Row) -> str:
    if row.passed is None:
        return "-"
    return "pass" if row.passed else "**miss**"


def plot(rows: Sequence[Row], path: Path) -> None:
    """One panel per row: median bar, min-max whisker, the target as a red line."""
    width = _LABEL_W + _PLOT_W + 2 * _MARGIN
    height = _MARGIN * 2 + 24 + _PANEL_H * len(rows)
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    draw.text(
        (_MARGIN, _MARGIN),
        "median (bar), min-max (whisker), target (red line); green = meets target",
        fill="black",
        font=font,
    )
    for n, row in enumerate(rows):
        top = _MARGIN + 24 + n * _PANEL_H
        scale_max = max(row.high, row.target or 0.0) * 1.15 or 1.0
        x0 = _MARGIN + _LABEL_W

        def x(value: float, x0: int = x0, scale_max: float = scale_max) -> int:
            return x0 + round(value / scale_max * (_PLOT_W - 10))

        draw.text((_MARGIN, top + 6), row.id, fill="black", font=font)
        draw.text((_MARGIN, top + 20), f"{row.unit}: {row.figure}"[:26], fill="gray", font=font)
        color = {True: (60, 160, 80), False: (210, 120, 40), None: (90, 120, 200)}[row.passed]
        bar_top, bar_bottom = top + 8, top + 30
        draw.rectangle((x0, bar_top, x(row.median), bar_bottom), fill=color)
        mid = (bar_top + bar_bottom) // 2
        draw.line((x(row.low), mid, x(row.high), mid), fill="black", width=2)
        for end in (row.low, row.high):
            draw.line((x(end), mid - 6, x(end), mid + 6), fill="black", width=2)
        if row.target is not None:
            draw.line((x(row.target), top + 2, x(row.target), top + 36), fill="red", width=2)
        label = f"{_fmt(row.median)} {row.unit}"
        if row.target is not None:
            label += f"  (target {row.comparison} {_fmt(row.target)})"
        draw.text((x0 + 4, top + 33), label, fill="black", font=font)
        draw.line((x0, top + _PANEL_H - 2, x0 + _PLOT_W, top + _PANEL_H - 2), fill=(220, 220, 220))
    im.save(path, format="PNG")


def _table(rows: Sequence[Row]) -> str:
    lines = [
        "| id | scenario | baseline (same run) | figure | median | min | max | target | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r.target is None else f"{r.comparison} {_fmt(r.target)} {r.unit}"
        if r.judge == "max":
            target += " (every sample)"
        lines.append(
            f"| {r.id} | {r.scenario} | {r.baseline} | {r.figure} | "
            f"{_fmt(r.median)} {r.unit} | {_fmt(r.low)} | {_fmt(r.high)} | {target} | "
            f"{_verdict(r)} |"
        )
    return "\n".join(lines)


def _details(rows: Sequence[Row]) -> str:
    out = []
    for r in rows:
        items = [f"`{k}`: {json.dumps(v)}" for k, v in r.details.items()]
        items += [f"{'ok' if ok else 'FAILED'}: {name}" for name, ok in r.checks.items()]
        out.append(f"- **{r.id}**: " + "; ".join(items))
    return "\n".join(out)


def write_report(
    rows: Sequence[Row],
    out_dir: Path,
    *,
    machine: dict[str, Any],
    command: str,
    quick: bool,
    elapsed_s: float,
    generated_at: str | None = None,
    merged: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write ``benchmarks.md``, ``benchmarks.png`` and ``benchmarks.json`` into ``out_dir``.

    ``merged``: later runs of some scenarios (``--merge``) whose rows replaced that run's,
    each ``{"ids": [...], "generated_at": ..., "elapsed_s": ...}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, out_dir / PLOT_NAME)
    when = generated_at or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (out_dir / RESULTS_NAME).write_text(
        json.dumps(
            {
                "generated_at": when,
                "quick": quick,
                "machine": machine,
                "elapsed_s": elapsed_s,
                "merged": list(merged),
                "rows": [r.to_json() for r in rows],
            },
            indent=2,
        )
    )
    findings = FINDINGS.read_text() if FINDINGS.exists() else ""
    mode = " (**--quick smoke run: small counts, the figures mean nothing**)" if quick else ""
    later = "".join(
        f" The rows of {', '.join(m['ids'])} come from a later run, `python -m benchmarks "
        f"--only {','.join(m['ids'])} --merge` on {m['generated_at']}, in "
        f"{m['elapsed_s'] / 60:.1f} minutes."
        for m in merged
    )
    page = f"""# Benchmarks

Generated by `{command}` on {when}{mode}, in {elapsed_s / 60:.1f} minutes.{later}
Machine: {machine["cpus"]} CPUs ({machine["processor"]}), {machine["platform"]},
Python {machine["python"]}. This is a shared, noisy 2-core box where other test runs
go on at the same time: absolute times are noise, **the ratios against a baseline
measured in the same run are the figures**. Each figure is the median of the
repetitions, with their min and max; a target is met when the median meets it and
every check of the row holds.

## How to run

```bash
make bench                                   # the full run (10 min on this box); rewrites this page
.venv/bin/python -m benchmarks --quick --output /tmp/bench   # small counts, 1 rep (about 1 min here)
.venv/bin/python -m benchmarks --report-only # re-render this page from docs/benchmarks.json
.venv/bin/python -m benchmarks --only P1,P3  # some scenarios only
.venv/bin/python -m benchmarks --only P8 --merge  # re-run some, keep this page's other rows
```

Everything runs on loopback: the local OctoAI-compatible server
(`LocalOctoAIServer(mode="process")`, so it never shares the client's CPU time or GIL)
and SeaweedFS (`weed server -s3`). The plot needs only Pillow.

## Results

{_table(rows)}

![benchmark figures]({PLOT_NAME})

### Numbers behind the figures

{_details(rows)}

{findings}
"""
    path = out_dir / PAGE_NAME
    path.write_text(page)
    return path
