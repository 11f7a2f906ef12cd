"""``python -m dagster_octoai.storage.clean``: remove what killed and failed writes left.

Runs :meth:`ImageStore.clean_up` on an S3 bucket (credentials from the environment or
boto3's default chain, never from the command line) or a local directory, under one
prefix, and prints what it removed. ``--dry-run`` lists without deleting.

Examples:
    .. code-block:: shell

        python -m dagster_octoai.storage.clean --bucket images --prefix dagster-octoai --dry-run
        python -m dagster_octoai.storage.clean --base-dir ./images --older-than-hours 48
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from ..api.errors import StorageError
from .backends import LocalBackend, S3Backend, StorageBackend
from .store import MIN_ORPHAN_AGE, ImageStore

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dagster_octoai.storage.clean",
        description=(
            "Remove the objects of image writes that never committed (killed or failed "
            "runs), the retired objects of commits cut short, version 1's _staging/ "
            "left-overs and old preflight probes. Nothing a committed manifest lists is "
            "removed, nor anything of a write that may still commit."
        ),
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bucket", help="the S3 bucket of the image IO manager")
    where.add_argument("--base-dir", help="the base_dir of a LocalImageIOManager")
    parser.add_argument("--prefix", default="dagster-octoai", help="the IO manager's prefix")
    parser.add_argument("--endpoint-url", help="S3 endpoint of an S3-compatible store")
    parser.add_argument("--region", help="S3 region to sign for")
    parser.add_argument("--addressing-style", default="path", choices=["auto", "path", "virtual"])
    parser.add_argument(
        "--older-than-hours",
        type=float,
        default=24.0,
        help=(
            "an uncommitted write is removed once nothing was written under it for this "
            f"long (default 24, at least {MIN_ORPHAN_AGE.total_seconds() / 3600:g})"
        ),
    )
    parser.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    parser.add_argument(
        "--now", type=datetime.fromisoformat, help=argparse.SUPPRESS
    )  # for tests: judge ages as of this time
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the clean-up; 0 when it ran, 2 when the store or the arguments are unusable."""
    args = _parser().parse_args(argv)
    backend: StorageBackend
    if args.base_dir:
        backend = LocalBackend(args.base_dir)
    else:
        backend = S3Backend.from_config(
            args.bucket,
            endpoint_url=args.endpoint_url,
            region_name=args.region,
            addressing_style=args.addressing_style,
        )
    store = ImageStore(backend, prefix=args.prefix)
    now = args.now.astimezone(timezone.utc) if args.now else None
    try:
        report = store.clean_up(
            older_than=timedelta(hours=args.older_than_hours), dry_run=args.dry_run, now=now
        )
    except (StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key in report.removed_keys:
        print(f"{'would remove' if report.dry_run else 'removed'} {backend.uri(key)}")
    for uri in report.unreadable_manifests:
        print(f"left alone (its manifest does not parse): {uri}")
    print(report.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover - the module's command line
    raise SystemExit(main())
