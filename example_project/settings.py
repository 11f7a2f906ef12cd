"""Where the example project's services are: read from environment variables, with local defaults.

Only non-secret settings are read here. Secrets (the OctoAI token, the S3 secret key)
are passed to resources as ``EnvVar`` so Dagster resolves them at run time and never
shows their values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: The local OctoAI-compatible server (`dagster-octoai serve`) listens here by default.
DEFAULT_OCTOAI_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_BUCKET = "octoai-example"
DEFAULT_OUTPUT_DIR = ".demo"


@dataclass(frozen=True)
class ExampleSettings:
    """The example's non-secret settings.

    Environment variables:
        OCTOAI_BASE_URL: OctoAI or a compatible server (default ``http://127.0.0.1:8000``).
        EXAMPLE_S3_ENDPOINT_URL: an S3-compatible endpoint (SeaweedFS, MinIO, R2). When it
            and ``EXAMPLE_S3_BUCKET`` are both unset, images go to a local directory instead.
        EXAMPLE_S3_BUCKET: the bucket (default ``octoai-example`` when an endpoint is set).
        EXAMPLE_S3_PREFIX: key prefix inside the bucket (default ``dagster-octoai``).
        EXAMPLE_OUTPUT_DIR: local folder for the contact sheet, the local image store and
            the async job ledger (default ``.demo``).

    Examples:
        >>> s = ExampleSettings.from_env({})
        >>> s.octoai_base_url, s.uses_s3
        ('http://127.0.0.1:8000', False)
    """

    octoai_base_url: str
    s3_endpoint_url: str | None
    s3_bucket: str | None
    s3_prefix: str
    output_dir: Path

    @property
    def uses_s3(self) -> bool:
        """Whether images are stored in S3 (else in ``output_dir/images``)."""
        return self.s3_bucket is not None

    @property
    def contact_sheet_path(self) -> Path:
        """Where the contact sheet PNG is written."""
        return self.output_dir / "contact_sheet.png"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ExampleSettings:
        """Settings from ``env`` (default: ``os.environ``)."""
        e = dict(os.environ) if env is None else env
        endpoint = e.get("EXAMPLE_S3_ENDPOINT_URL") or None
        bucket = e.get("EXAMPLE_S3_BUCKET") or (DEFAULT_BUCKET if endpoint else None)
        return cls(
            octoai_base_url=e.get("OCTOAI_BASE_URL") or DEFAULT_OCTOAI_BASE_URL,
            s3_endpoint_url=endpoint,
            s3_bucket=bucket,
            s3_prefix=e.get("EXAMPLE_S3_PREFIX", "dagster-octoai"),
            output_dir=Path(e.get("EXAMPLE_OUTPUT_DIR") or DEFAULT_OUTPUT_DIR).resolve(),
        )
