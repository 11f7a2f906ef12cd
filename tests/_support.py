"""Fixtures and helpers shared by the top-level test modules.

A module uses a fixture by importing it (and naming it in ``__all__``, so the import
reads as used): tests/conftest.py stays the suite-wide set-up.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, EnvVar, instance_for_test

from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.plugin import TEST_TOKEN
from dagster_octoai.testing.seaweedfs import SeaweedFS

#: The token of the servers started here: the plugin's, which the suite-wide log scan knows.
TOKEN = TEST_TOKEN


@pytest.fixture
def octoai(octoai_server: Any, monkeypatch: pytest.MonkeyPatch) -> OctoAIResource:
    """The resource on the plugin's session server, its token read from ``OCTOAI_TOKEN``."""
    monkeypatch.setenv("OCTOAI_TOKEN", octoai_server.token or "any-token")
    return OctoAIResource(token=EnvVar("OCTOAI_TOKEN"), base_url=octoai_server.url)


@pytest.fixture(name="instance")
def ephemeral_instance() -> Iterator[DagsterInstance]:
    """``instance``: an ephemeral Dagster instance per test."""
    with DagsterInstance.ephemeral() as inst:
        yield inst


@pytest.fixture(scope="module", name="instance")
def module_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterInstance]:
    """``instance``: one sqlite instance per module.

    Shared by the module's tests, so response ids (partitions, run tags) never collide.
    """
    with instance_for_test(temp_dir=str(tmp_path_factory.mktemp("dagster"))) as inst:
        yield inst


@pytest.fixture(scope="module")
def module_server() -> Iterator[LocalOctoAIServer]:
    """One local OctoAI server per module (token :data:`TOKEN`).

    A module's own ``server`` fixture configures it for each test.
    """
    with LocalOctoAIServer(ServerConfig(token=TOKEN)) as srv:
        yield srv


def s3_images(s3: SeaweedFS, bucket: str, **overrides: Any) -> S3ImageIOManager:
    """The S3 image IO manager on ``s3`` (path-style addressing), with ``overrides``."""
    settings: dict[str, Any] = {
        "bucket": bucket,
        "endpoint_url": s3.endpoint_url,
        "region_name": s3.region,
        "aws_access_key_id": s3.access_key,
        "aws_secret_access_key": s3.secret_key,
        "addressing_style": "path",
        **overrides,
    }
    return S3ImageIOManager(**settings)


def example_project_env(
    server: LocalOctoAIServer, s3: SeaweedFS, bucket: str, output_dir: Path
) -> dict[str, str]:
    """The environment the example project reads: ``server``, a bucket on ``s3``, an output dir."""
    assert server.token is not None
    return {
        "OCTOAI_BASE_URL": server.url,
        "OCTOAI_TOKEN": server.token,
        "EXAMPLE_S3_ENDPOINT_URL": s3.endpoint_url,
        "EXAMPLE_S3_BUCKET": bucket,
        "EXAMPLE_OUTPUT_DIR": str(output_dir),
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_REGION": s3.region,
    }


# ---- the browser tests' Chromium ---------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
#: Debian's chromium, headless, without the background traffic a CI box cannot reach.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get by scripts/ensure_chromium.sh when missing."""
    if not CHROMIUM.exists():
        script = Path(__file__).resolve().parent.parent / "scripts" / "ensure_chromium.sh"
        subprocess.run([str(script)], check=True, timeout=900)
    assert CHROMIUM.exists(), f"{CHROMIUM} is still missing after ensure_chromium.sh"
    return CHROMIUM
