"""The Dagster UI in a real browser: materialize an example asset and see its thumbnail and seed.

``dagster dev`` runs the example project against the local OctoAI-compatible server and
SeaweedFS; headless Debian Chromium, driven by Playwright, launches a run from the asset
page, then opens the materialization and checks what a person would look at. The browser
is the system's ``/usr/bin/chromium`` (installed by ``scripts/ensure_chromium.sh`` when
missing), never one downloaded by Playwright.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support import CHROMIUM_ARGS, chromium, example_project_env

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs
from devtools.dagster_dev import DagsterDev

__all__ = ["chromium", "s3_bucket", "seaweedfs"]  # fixtures used by name

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "test-output" / "browser"
ASSET = "product_images"
PARTITION = "desk-lamp"
UI_TIMEOUT_MS = 60_000
RUN_TIMEOUT_S = 300.0

_RUNS_QUERY = """
query { runsOrError { ... on Runs { results { runId status } } } }
"""
_MATERIALIZATION_QUERY = """
query ($key: AssetKeyInput!, $partition: String!) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(partitions: [$partition], limit: 1) {
        runId
        metadataEntries {
          label
          ... on JsonMetadataEntry { jsonString }
          ... on MarkdownMetadataEntry { mdStr }
        }
      }
    }
  }
}
"""


@pytest.fixture
def dagster_ui(
    octoai_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DagsterDev]:
    """``dagster dev`` on the example project, with the upstream catalogue partition present."""
    from dagster import AssetKey, DagsterInstance

    from example_project.definitions import build_definitions
    from example_project.settings import ExampleSettings

    env = example_project_env(octoai_server, seaweedfs, s3_bucket, tmp_path / "output")
    for name, value in env.items():  # the resources read the token and S3 keys from it
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # The UI test is about product_images: its catalogue record is made first, in this
    # process, on the instance dagster dev then opens.
    defs = build_definitions(ExampleSettings.from_env(env))
    with DagsterInstance.from_config(str(home)) as instance:
        setup = defs.resolve_job_def("product_images_job").execute_in_process(
            instance=instance,
            partition_key=PARTITION,
            asset_selection=[AssetKey("prompt_catalogue")],
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        assert setup.success
    # A loaded 2-core box can take minutes to start the webserver, daemon and code server.
    with DagsterDev(
        module="example_project.definitions",
        cwd=REPO,
        env=env,
        dagster_home=home,
        startup_timeout_s=400,
    ) as dev:
        yield dev


def _graphql(dev: DagsterDev, query: str, **variables: Any) -> dict[str, Any]:
    answer = httpx.post(
        f"{dev.url}/graphql", json={"query": query, "variables": variables}, timeout=30
    )
    answer.raise_for_status()
    body: dict[str, Any] = answer.json()
    assert "errors" not in body, body["errors"]
    data: dict[str, Any] = body["data"]
    return data


def _wait_for_new_runs_to_finish(dev: DagsterDev, known: int) -> list[dict[str, str]]:
    """Every run of the instance, once there are more than ``known`` and none is going."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        runs: list[dict[str, str]] = _graphql(dev, _RUNS_QUERY)["runsOrError"]["results"]
        done = all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs)
        if len(runs) > known and done:
            return runs
        assert time.monotonic() < deadline, f"runs still going after {RUN_TIMEOUT_S}s: {runs}"
        time.sleep(2)


def test_materialize_from_the_ui_shows_thumbnail_and_seed(
    chromium: Path, dagster_ui: DagsterDev, octoai_server: LocalOctoAIServer
) -> None:
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"{dagster_ui.url}/assets/{ASSET}")
            # First load of a fresh instance asks to join the community.
            page.get_by_role("button", name="Skip").click()

            runs_before = _graphql(dagster_ui, _RUNS_QUERY)["runsOrError"]["results"]
            page.locator("button", has_text=re.compile(r"^Materialize")).first.click()
            # A partitioned asset opens the launch dialog: pick one partition, launch one run.
            expect(page.get_by_text(f"Launch runs to materialize {ASSET}")).to_be_visible()
            page.get_by_text("Select a partition or create one").click()
            page.get_by_title(PARTITION, exact=True).click()
            page.keyboard.press("Escape")
            page.get_by_role("button", name="Launch 1 run").click()

            runs = _wait_for_new_runs_to_finish(dagster_ui, len(runs_before))
            assert len(runs) == len(runs_before) + 1, "the UI did not launch exactly one run"
            assert all(r["status"] == "SUCCESS" for r in runs), runs

            # What the instance recorded, to compare the page against.
            asset = _graphql(
                dagster_ui, _MATERIALIZATION_QUERY, key={"path": [ASSET]}, partition=PARTITION
            )["assetOrError"]
            (materialization,) = asset["assetMaterializations"]
            entries = {e["label"]: e for e in materialization["metadataEntries"]}
            seeds = json.loads(entries["seeds"]["jsonString"])
            assert seeds == [1001]  # the example's explicit seed for product_images

            page.reload()
            page.get_by_role("tab", name="Events").click()
            expect(page.get_by_text(re.compile("materialized in run")).first).to_be_visible()
            expect(
                page.get_by_role("link", name=materialization["runId"][:8]).first
            ).to_be_visible()
            seeds_row = page.locator("tr", has=page.locator("td", has_text=re.compile(r"^seeds$")))
            expect(seeds_row).to_contain_text(str(seeds[0]))

            page.screenshot(path=str(SCREENSHOTS / "materialization.png"))
            # Long markdown metadata sits behind a "[Show Markdown]" link that opens a dialog.
            thumbnail_row = page.locator(
                "tr", has=page.locator("td", has_text=re.compile(r"^thumbnail$"))
            )
            show = thumbnail_row.get_by_text("[Show Markdown]")
            scope = thumbnail_row
            if show.count():
                show.click()
                scope = page.get_by_role("dialog")
            thumbnail = scope.locator('img[src^="data:image/"]').first
            expect(thumbnail).to_be_visible()
            assert thumbnail.get_attribute("alt") == f"seed {seeds[0]}"
            expect(scope).to_contain_text(f"seed {seeds[0]}")
            decoded = thumbnail.evaluate(
                "img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0"
            )
            assert decoded, "the thumbnail's data: URI did not decode in the browser"
            page.screenshot(path=str(SCREENSHOTS / "thumbnail.png"))
            # The token the resource was configured with never reaches the page.
            assert octoai_server.token is not None
            assert octoai_server.token not in page.content()
        finally:
            browser.close()
    for name in ("materialization.png", "thumbnail.png"):
        assert (SCREENSHOTS / name).stat().st_size > 10_000
