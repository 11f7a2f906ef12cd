"""Suite-wide set-up.

- A throwaway Dagster home with telemetry off, before Dagster is imported.
- Every test's logs are captured at DEBUG and scanned for the suite's tokens: a test
  fails if any log record holds one, so "the token is never logged" is checked by the
  whole suite, not by a few tests.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_octoai.testing.plugin import TEST_ADMIN_TOKEN, TEST_TOKEN
from devtools.secrets import TokenScanner

_home = Path(tempfile.mkdtemp(prefix="dagster-octoai-home-"))
(_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
os.environ["DAGSTER_HOME"] = str(_home)
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def suite_tokens() -> tuple[str, ...]:
    """Tokens no log may hold; a conftest deeper down may add its own."""
    return (TEST_TOKEN, TEST_ADMIN_TOKEN)


@pytest.fixture(autouse=True)
def _tokens_never_logged(
    caplog: pytest.LogCaptureFixture, suite_tokens: tuple[str, ...]
) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    # botocore logs every signed S3 request at DEBUG (megabytes per batch); the OctoAI
    # token never reaches boto3, so INFO there keeps the capture small and loses nothing.
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        caplog.set_level(logging.INFO, logger=name)
    yield
    leaks = []
    for scanner in (TokenScanner(token) for token in suite_tokens):
        leaks += scanner.scan_text(caplog.text, "captured log text")
        for record in caplog.records:
            leaks += scanner.scan_text(record.getMessage(), f"log record {record.name}")
            if record.exc_text:
                leaks += scanner.scan_text(record.exc_text, f"log record {record.name} traceback")
    assert leaks == [], f"a token leaked into the logs: {leaks}"
