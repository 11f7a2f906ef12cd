"""`make dev`: the Dagster UI on the example project, with the demo's local services.

Starts the local OctoAI-compatible server and SeaweedFS (as `make demo` does), then
``dagster dev -m example_project.definitions`` in the foreground until Ctrl-C, then
stops everything it started. Runs and event logs are kept in ``.dagster_home/`` so they
survive a restart; images go to the SeaweedFS started here, which is emptied each time.

Usage: python scripts/dev.py [--port 3000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _services import REPO, fail, progress, running_services


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000, help="the UI's port (default 3000)")
    parser.add_argument(
        "--dagster-home",
        type=Path,
        default=REPO / ".dagster_home",
        help="where runs and event logs are kept (default .dagster_home)",
    )
    args = parser.parse_args(argv)

    from devtools.dagster_dev import DagsterDev

    try:
        with running_services(REPO / ".demo") as services:
            progress("starting dagster dev on example_project.definitions (this takes a while)")
            with DagsterDev(
                module="example_project.definitions",
                cwd=REPO,
                env=services.env,
                port=args.port,
                dagster_home=args.dagster_home,
                echo_output=True,
                startup_timeout_s=600,
            ) as dev:
                progress(f"Dagster UI: {dev.url}  (Ctrl-C to stop)")
                code = dev.wait()
                return fail(f"dagster dev exited with code {code}")
    except KeyboardInterrupt:
        progress("stopped")
        return 0
    except Exception as exc:
        return fail(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
