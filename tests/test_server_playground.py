"""The web playground in a real browser: generate, see the image and its seed, see errors.

Headless Debian Chromium (``/usr/bin/chromium``, never a browser Playwright downloads)
drives ``/playground`` on a server with the default configuration (control routes off):
the page reaches the API with the token a person types, as any client would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _support import CHROMIUM_ARGS, chromium

from dagster_octoai.api.models import Engine
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.server.playground import playground_options

__all__ = ["chromium"]  # a fixture used by name

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "test-output" / "browser"
TOKEN = "playground-token-93c1a7"
UI_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server() -> Iterator[LocalOctoAIServer]:
    with LocalOctoAIServer(ServerConfig(token=TOKEN), controls=False) as srv:
        yield srv


def test_the_page_and_its_files_are_served_with_a_strict_policy(
    server: LocalOctoAIServer,
) -> None:
    page = httpx.get(f"{server.url}/playground")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    root = httpx.get(f"{server.url}/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/playground"
    for name in ("playground.js", "playground.css"):
        assert httpx.get(f"{server.url}/playground/{name}").status_code == 200
    assert httpx.get(f"{server.url}/playground/options.json").json() == playground_options()
    assert httpx.get(f"{server.url}/playground/../config.py").status_code == 404
    assert httpx.get(f"{server.url}/playground/renderer.py").status_code == 404


def test_the_playground_can_be_turned_off() -> None:
    with LocalOctoAIServer(ServerConfig(token=TOKEN, playground=False), controls=False) as srv:
        assert httpx.get(f"{srv.url}/playground").status_code == 404


def test_generate_see_the_image_and_seed_and_field_errors(
    chromium: Path, server: LocalOctoAIServer
) -> None:
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"{server.url}/playground")
            # The placeholder serves every engine: those the page has inputs for.
            expect(page.locator("#engine option")).to_have_count(6)

            # No token yet: the page says so at the token field, and sends nothing.
            page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk, oil painting")
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#error-token")).to_contain_text("Enter the API token")

            # A wrong token: the server's 401 shows at the token field.
            page.get_by_label("API token").fill("not-the-token")
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#error-token")).to_contain_text("Invalid bearer token")

            # Generate on SDXL with every setting the page has.
            page.get_by_label("API token").fill(TOKEN)
            page.get_by_label("Negative prompt").fill("fog")
            page.locator("#size").select_option("1152x896")
            page.get_by_label("Steps").fill("20")
            page.get_by_label("Sampler").select_option("K_EULER_ANCESTRAL")
            page.get_by_label("CFG scale").fill("7.5")
            page.get_by_label("Seed").fill("4242")
            page.get_by_label("Style preset").select_option("cinematic")
            page.get_by_label("Images").fill("2")
            page.get_by_role("button", name="Generate").click()
            images = page.locator("#images figure img")
            expect(images).to_have_count(2)
            expect(page.locator("#images .seed")).to_have_text(["seed 4242", "seed 4243"])
            sizes = images.evaluate_all(
                "imgs => imgs.map(i => i.complete ? [i.naturalWidth, i.naturalHeight] : null)"
            )
            assert sizes == [[1152, 896], [1152, 896]]
            expect(page.locator("#status")).to_contain_text("2 images in")
            page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=True)

            # "Use seed" puts an image's seed back into the form.
            page.locator("#images figure").nth(1).get_by_role("button", name="Use seed").click()
            expect(page.get_by_label("Seed")).to_have_value("4243")

            # Bad values: each shows under its own field, from the server's 422.
            page.get_by_label("Steps").fill("500")
            page.get_by_label("CFG scale").fill("lots")
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#error-steps")).to_contain_text("less than or equal to 200")
            expect(page.locator("#error-cfg_scale")).to_contain_text("valid number")
            expect(page.get_by_label("Steps")).to_have_attribute("aria-invalid", "true")
            expect(page.locator("#error-prompt")).to_be_empty()
            page.screenshot(path=str(SCREENSHOTS / "playground-errors.png"), full_page=True)

            # SD 1.5 has no style presets; its sizes are its own.
            page.get_by_label("Engine").select_option("sd")
            expect(page.get_by_label("Style preset")).to_be_disabled()
            expect(page.locator("#size")).to_have_value("512x512")

            # FLUX.1 [schnell] refuses samplers and negative prompts; its steps default to 4.
            page.get_by_label("Engine").select_option("flux-schnell")
            expect(page.get_by_label("Sampler")).to_be_disabled()
            expect(page.get_by_label("Negative prompt")).to_be_disabled()
            expect(page.get_by_label("Steps")).to_have_value("4")
            page.get_by_label("CFG scale").fill("5")
            page.get_by_label("Seed").fill("77")
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#images .seed")).to_have_text(["seed 77", "seed 78"])

            # The token never left the page's memory: not in the address, storage or cookies.
            assert TOKEN not in page.url
            stored = page.evaluate(
                "() => JSON.stringify([Object.entries(localStorage),"
                " Object.entries(sessionStorage), document.cookie])"
            )
            assert TOKEN not in stored
            assert not page.context.cookies()
        finally:
            browser.close()
    # docs/images/playground.png is a copy of this screenshot.
    assert (SCREENSHOTS / "playground.png").stat().st_size > 20_000


def test_the_playground_offers_only_the_engines_the_backend_serves() -> None:
    # A diffusers backend with SD 1.5 models only answers sd and controlnet-sd15.
    names = [e["name"] for e in playground_options(("sd", "controlnet-sd15"))["engines"]]
    assert names == ["sd"]
    # The placeholder serves every engine: all but the ControlNet ones (a mode of sdxl, sd).
    every = [e.value for e in Engine if not e.value.startswith("controlnet-")]
    assert [e["name"] for e in playground_options()["engines"]] == every
