"""Fixtures of the reliability suite: one SeaweedFS, the leak token, figures for the report.

Every test here runs with the recognisable token :data:`LEAK_TOKEN`; the suite-wide
log scan of tests/conftest.py looks for it as well as the plugin's test token. The
``octoai_server`` here (one per module) replaces the plugin's; a module that needs a
server of another kind defines its own.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.plugin import TEST_TOKEN
from dagster_octoai.testing.seaweedfs import SeaweedFS
from devtools.postgres import PostgresCluster, PostgresUnavailable
from devtools.secrets import TokenScanner

from ._support import LEAK_TOKEN, Figures

FIGURES_ENV = "DAGSTER_OCTOAI_RELIABILITY_FIGURES"


@pytest.fixture(scope="session")
def scanner() -> TokenScanner:
    """The scanner of the suite's token."""
    return TokenScanner(LEAK_TOKEN)


@pytest.fixture(scope="session")
def suite_tokens() -> tuple[str, ...]:
    """The suite-wide log scan (tests/conftest.py) looks for the leak token here too."""
    return (TEST_TOKEN, LEAK_TOKEN)


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """Figures for docs/reliability.md, written as JSON when the report script asks."""
    collected = Figures()
    yield collected
    target = os.environ.get(FIGURES_ENV)
    if target:
        path = Path(target)
        # Each worker of a parallel run adds its figures: one at a time.
        with FileLock(f"{path}.lock"):
            existing: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
            existing.update(collected.rows)
            path.write_text(json.dumps(existing, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def octoai_server() -> Iterator[LocalOctoAIServer]:
    """An instant local OctoAI server per module, with the suite's token."""
    with LocalOctoAIServer(ServerConfig(token=LEAK_TOKEN)) as srv:
        yield srv


@pytest.fixture
def dagster_home(tmp_path: Path) -> Path:
    """A Dagster home of the test's own (telemetry off), for instances here and in children."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the reliability suite."""
    server = SeaweedFS().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(seaweedfs: SeaweedFS) -> Iterator[str]:
    """A fresh bucket on the suite's SeaweedFS."""
    name = "rel-" + secrets.token_hex(6)
    client = seaweedfs.client()
    client.create_bucket(Bucket=name)
    yield name
    try:
        client.delete_bucket(Bucket=name)
    except Exception as exc:  # a failed clean-up must not hide the test's own result
        logging.getLogger(__name__).warning("could not delete bucket %s: %s", name, exc)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster (installed with apt-get first when missing and root).

    Skips, loudly, only where PostgreSQL can be neither found nor installed.
    """
    cluster = PostgresCluster()
    try:
        cluster.start()
    except PostgresUnavailable as exc:
        reason = f"POSTGRES TESTS SKIPPED: PostgreSQL is unavailable here: {exc}"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        cluster.stop()
