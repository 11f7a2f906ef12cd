"""`make dev`: the Dagster UI on the example project, with the demo's local services.

Starts the local OctoAI-compatible server and SeaweedFS (as `make demo` does), then
``dagster dev -m example_project.definitions`` until Ctrl-C (or SIGTERM), then stops
everything it started. A second Ctrl-C does not cut the stop short.

The instance (runs, event logs, materializations) is kept in ``$DAGSTER_HOME`` when it
is set, else in ``.dagster_home/``. SeaweedFS keeps its bucket in ``s3/`` inside that
home, so after a restart every materialization the instance remembers still has its
images: the two are kept, and removed, together.

Usage: python scripts/dev.py [--port 3000] [--dagster-home DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _services import REPO, Shutdown, StopRequested, fail, progress, running_services

#: Where SeaweedFS keeps its data, inside the instance's home.
S3_DATA = "s3"


def default_dagster_home() -> Path:
    """``$DAGSTER_HOME`` when set (a user's own instance), else ``.dagster_home/``."""
    home = os.environ.get("DAGSTER_HOME", "").strip()
    return Path(home) if home else REPO / ".dagster_home"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000, help="the UI's port (default 3000)")
    parser.add_argument(
        "--dagster-home",
        type=Path,
        default=default_dagster_home(),
        help="where runs, event logs and the S3 data are kept "
        "(default: $DAGSTER_HOME, else .dagster_home)",
    )
    args = parser.parse_args(argv)
    home: Path = args.dagster_home.resolve()
    shutdown = Shutdown(interrupt=False).install()

    from devtools.dagster_dev import DagsterDev, DagsterDevError

    try:
        with running_services(
            REPO / ".demo", shutdown=shutdown, s3_data_dir=home / S3_DATA
        ) as services:
            progress(f"starting dagster dev on example_project.definitions, instance in {home}")
            with DagsterDev(
                module="example_project.definitions",
                cwd=REPO,
                env=services.env,
                port=args.port,
                dagster_home=home,
                echo_output=True,
                startup_timeout_s=600,
                abort=shutdown.requested,
            ) as dev:
                progress(f"Dagster UI: {dev.url}  (Ctrl-C to stop)")
                code = dev.wait_or_stop(shutdown.requested)
                if code is not None:
                    return fail(f"dagster dev exited with code {code}")
                progress("stopping dagster dev")
        progress("stopped")
        return 0
    except (StopRequested, DagsterDevError) as exc:
        if shutdown.requested.is_set():
            progress("stopped")
            return 0
        return fail(f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        return fail(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
