"""The playground page at ``/``: how it is served, and the page itself in a real browser
(headless Chromium driven by Selenium) against a real server on the tiny models.

The browser tests need ``chromium`` and ``chromedriver`` (Debian's ``chromium`` and
``chromium-driver`` packages; ``.ci/run`` installs them). Without them the tests skip, saying
why, except under ``CI=true``, where they fail: CI must prove that they ran. Every state the
tests reach is kept as a screenshot under ``tests/artifacts/playground/``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from limner import GenerationResult, ImageGenerationConfig, Progress, Registry
from limner.plugin import StepCallback
from limner.server import ServerSettings, create_app
from limner.testing import fake_embedding_spec

pytestmark = pytest.mark.browser  # headless Chromium

if TYPE_CHECKING:
    from tests.server.conftest import ErrorOf, Serve, Served, ServerFactory, WaitFor

try:  # the dev extra brings Selenium; without it the browser tests skip (fail in CI)
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver import Chrome
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import Select, WebDriverWait

    HAVE_SELENIUM = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_SELENIUM = False

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "playground"
TINY_CLIP = "limner/tiny-clip"
TINY_FLUX = "limner/tiny-flux"
KEY = "playground-key"


# -- the page over HTTP -------------------------------------------------------------------------


def test_the_page_and_its_assets_are_served_self_contained(make_server: ServerFactory) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"))
    with served.client() as client:
        page = client.get("/")
        assets = {path: client.get(path) for path in ("/ui/app.js", "/ui/edit.js", "/ui/style.css")}
        schema = client.get("/openapi.json").json()
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert assets["/ui/app.js"].headers["content-type"].startswith("text/javascript")
    assert assets["/ui/edit.js"].headers["content-type"].startswith("text/javascript")
    assert assets["/ui/style.css"].headers["content-type"].startswith("text/css")
    for text in (page.text, *(answer.text for answer in assets.values())):
        # Nothing from elsewhere: users may be offline, and the policy would block it anyway.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
        assert not re.search(r"""url\(\s*["']?(https?:)?//""", text)
        assert not re.search(r"""import\s*\(|fetch\(\s*["']https?:""", text)
    assert "/" not in schema["paths"] and "/ui/app.js" not in schema["paths"]


def test_docs_and_their_assets_are_served_from_here(make_server: ServerFactory) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"), ui=False)  # /docs either way
    with served.client() as client:
        page = client.get("/docs")
        script = client.get("/docs/swagger-ui-bundle.js")
        stylesheet = client.get("/docs/swagger-ui.css")
        schema = client.get("/openapi.json").json()
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # The page names only this server's files: nothing from a CDN, no icon from elsewhere.
    assert not re.search(r"""(src|href|url)\s*[=:]\s*["']?(https?:)?//""", page.text)
    assert 'src="/docs/swagger-ui-bundle.js"' in page.text
    assert 'href="/docs/swagger-ui.css"' in page.text
    assert "'/openapi.json'" in page.text
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    assert "SwaggerUIBundle" in script.text[:2000] and len(script.content) > 500_000
    assert stylesheet.status_code == 200 and stylesheet.headers["content-type"].startswith(
        "text/css"
    )
    assert ".swagger-ui" in stylesheet.text
    assert not any(path.startswith("/docs") for path in schema["paths"])


def test_no_ui_turns_the_page_off(make_server: ServerFactory, error_of: ErrorOf) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"), ui=False)
    with served.client() as client:
        for path in ("/", "/ui/app.js", "/ui/edit.js", "/ui/style.css"):
            answer = client.get(path)
            assert answer.status_code == 404, path
            assert error_of(answer)["code"] == "not_found"


def test_the_page_needs_no_key_but_the_api_does(make_server: ServerFactory) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"), api_key=KEY)
    with served.client() as client:
        for path in ("/", "/ui/app.js", "/ui/style.css"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/models").status_code == 401
        assert client.get("/ui/other.js").status_code == 401  # only the page's own files


def test_limner_serve_no_ui_builds_an_app_without_the_page(served_apps: list[Any]) -> None:
    from limner._cli import cli

    pytest.importorskip("limner_clip", reason="serves the CLIP plugin's tiny model")

    for arguments, has_page in (([], True), (["--no-ui"], False)):
        result = CliRunner().invoke(
            cli, ["serve", "--port", "0", "--models", TINY_CLIP, *arguments]
        )
        assert result.exit_code == 0, result.output
        paths = {getattr(route, "path", None) for route in served_apps[-1].routes}
        assert ("/" in paths) is has_page
        assert "/v1/embeddings" in paths


@pytest.fixture(scope="module")
def flux_registry(hf_cache: Path) -> Registry:
    limner_flux = pytest.importorskip("limner_flux")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_flux)
    return registry


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


# -- the page in a browser ----------------------------------------------------------------------

# Headless Chromium as root on a machine without a network: no sandbox (root), no GPU, and
# none of the background connections it would make and have refused. No network either where
# there is one: every host name but the test servers' 127.0.0.1 fails to resolve, so a page
# that needs a CDN fails here as it would offline.
CHROMIUM_FLAGS = (
    "--headless",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
STEP_SECONDS = 0.05
"""How long the browser tests' tiny FLUX takes per step at least: long enough for a browser
to see a generation run, whatever the machine's speed."""


def browser_missing(what: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{what}; CI=true, so the browser tests must run, not skip")
    pytest.skip(what)


def find_program(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    browser_missing(
        f"no {' or '.join(names)} on PATH: apt-get install chromium chromium-driver "
        "to run the browser tests"
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chrome]:
    """One headless Chromium for the module; each test loads the page afresh."""
    if not HAVE_SELENIUM:
        browser_missing("selenium is not installed: pip install -e '.[dev]'")
    options = Options()
    options.binary_location = find_program("chromium", "chromium-browser")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=find_program("chromedriver"))
    driver = Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nplayground screenshots: {ARTIFACTS}")
    try:
        yield driver
    finally:
        driver.quit()


class SlowTinyFluxMixin:
    """The tiny FLUX, at least ``STEP_SECONDS`` a step, counting the steps it runs."""

    steps_run = 0

    def generate(
        self, prompt: str, config: ImageGenerationConfig, *, on_step: StepCallback
    ) -> GenerationResult:
        def slow_step(progress: Progress) -> None:
            time.sleep(STEP_SECONDS)
            self.steps_run += 1
            on_step(progress)

        result: GenerationResult = super().generate(  # type: ignore[misc]
            prompt, config, on_step=slow_step
        )
        return result

    def edit(
        self,
        prompt: str,
        config: ImageGenerationConfig,
        image: Any,
        mask: Any,
        *,
        on_step: StepCallback,
    ) -> GenerationResult:
        def slow_step(progress: Progress) -> None:
            time.sleep(STEP_SECONDS)
            self.steps_run += 1
            on_step(progress)

        result: GenerationResult = super().edit(  # type: ignore[misc]
            prompt, config, image, mask, on_step=slow_step
        )
        return result


@dataclasses.dataclass
class Playground:
    served: Served
    flux: SlowTinyFluxMixin


@pytest.fixture(scope="module")
def playground(flux_registry: Registry, serve: Serve, wait_for: WaitFor) -> Iterator[Playground]:
    """The tiny CLIP and a slowed tiny FLUX, both preloaded, served with the page."""
    limner_clip = pytest.importorskip("limner_clip")
    from limner_flux._backend import FluxBackend

    class SlowTinyFlux(SlowTinyFluxMixin, FluxBackend):
        pass

    registry = Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    tiny_flux = next(entry.spec for entry in flux_registry.entries() if entry.key == TINY_FLUX)
    registry.register(dataclasses.replace(tiny_flux, factory=SlowTinyFlux))
    settings = ServerSettings(models=[TINY_CLIP, TINY_FLUX], preload=[TINY_CLIP, TINY_FLUX])
    with serve(create_app(registry=registry, settings=settings), registry) as served:
        with served.client() as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout=120, what="preloads")
        flux = registry.generator(TINY_FLUX).backend
        assert isinstance(flux, SlowTinyFluxMixin)
        yield Playground(served, flux)


@pytest.fixture(scope="module")
def keyed_playground(serve: Serve, hf_cache: Path) -> Iterator[Served]:
    limner_clip = pytest.importorskip("limner_clip")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    settings = ServerSettings(models=[TINY_CLIP], api_key=KEY)
    with serve(create_app(registry=registry, settings=settings), registry) as served:
        yield served


# -- browser helpers --


def until(
    driver: Chrome, condition: Callable[[Chrome], Any], what: str, timeout: float = 30
) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        shot(driver, "timeout")
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def by_id(driver: Chrome, element_id: str) -> WebElement:
    return driver.find_element(By.ID, element_id)


def text_of(driver: Chrome, element_id: str) -> str:
    return by_id(driver, element_id).text


def shot(driver: Chrome, name: str) -> Path:
    """The whole page, below the fold included, as ``ARTIFACTS/name.png``."""
    path = ARTIFACTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    # The whole window's width: a capture beyond the viewport has no scroll bar.
    width, height = driver.execute_script(
        "return [window.innerWidth, document.documentElement.scrollHeight];"
    )
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    capture = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(capture["data"]))
    return path


def console_errors(driver: Chrome) -> list[dict[str, Any]]:
    """The console's errors since the last call (reading the log empties it)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [entry for entry in entries if entry["level"] == "SEVERE"]


def open_page(driver: Chrome, url: str) -> None:
    console_errors(driver)  # forget the previous test's page
    driver.get(url + "/")
    until(
        driver,
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-connection"),
        "the page to reach the API",
    )


def connected(driver: Chrome) -> bool:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-connection") == "ok"


def record_images(driver: Chrome) -> None:
    """Remember every image the generate panel shows, however briefly."""
    driver.execute_script(
        """
        const image = document.getElementById("gen-image");
        window.shownImages = [];
        new MutationObserver(() => window.shownImages.push(image.src))
            .observe(image, {attributes: true, attributeFilter: ["src"]});
        """
    )


def shown_images(driver: Chrome) -> list[str]:
    shown: list[str] = driver.execute_script("return window.shownImages")
    return shown


def fill(driver: Chrome, values: dict[str, str]) -> None:
    for element_id, value in values.items():
        field = by_id(driver, element_id)
        field.clear()
        field.send_keys(value)


def downloaded_b64(driver: Chrome, url: str | None) -> str:
    """What the page's ``url`` (a blob: link) holds, base64-encoded, read by the page."""
    downloaded: str = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then((r) => r.arrayBuffer()).then((buffer) => {
            let text = "";
            for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
            done(btoa(text));
        }).catch((error) => done(String(error)));
        """,
        url,
    )
    return downloaded


def generation_state(driver: Chrome) -> str:
    return by_id(driver, "generate").get_attribute("data-state") or ""


# -- browser tests --


def test_the_page_loads_without_console_errors(browser: Chrome, playground: Playground) -> None:
    open_page(browser, playground.served.url)
    assert connected(browser), text_of(browser, "connection")
    models = [o.get_attribute("value") for o in Select(by_id(browser, "gen-model")).options]
    assert models == [TINY_FLUX]
    edit_models = [o.get_attribute("value") for o in Select(by_id(browser, "edit-model")).options]
    assert edit_models == [TINY_FLUX]
    assert not by_id(browser, "edit-button").is_enabled()  # no image yet
    search_model = Select(by_id(browser, "search-model")).first_selected_option
    assert search_model.get_attribute("value") == TINY_CLIP
    until(
        browser,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pool-table tbody tr")) == 2,
        "the pool table",
    )
    rows = {
        row.get_attribute("data-key"): row.text
        for row in browser.find_elements(By.CSS_SELECTOR, "#pool-table tbody tr")
    }
    assert set(rows) == {TINY_CLIP, TINY_FLUX}
    assert all("ready" in row for row in rows.values())
    assert "2 loaded" in text_of(browser, "pool-summary")
    # Every control has a label a screen reader reads out.
    unlabelled = browser.execute_script(
        """
        return [...document.querySelectorAll("input, select, textarea, button")]
            .filter((c) => !(c.labels && c.labels.length) && !c.getAttribute("aria-label")
                           && !c.textContent.trim())
            .map((c) => c.id);
        """
    )
    assert unlabelled == []
    shot(browser, "loaded")
    # A phone: one column, nothing wider than the screen.
    browser.set_window_size(390, 844)
    try:
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        shot(browser, "phone")
    finally:
        browser.set_window_size(1280, 1000)
    assert console_errors(browser) == []


def test_a_generation_shows_previews_then_the_final_image(
    browser: Chrome, playground: Playground
) -> None:
    open_page(browser, playground.served.url)
    fill(browser, {"prompt": "a lighthouse at dusk", "width": "128", "height": "128"})
    fill(browser, {"steps": "6", "seed": "7"})
    record_images(browser)
    by_id(browser, "generate-button").click()
    until(browser, lambda d: generation_state(d) == "done", "the final image", timeout=60)
    shown = shown_images(browser)
    previews = [src for src in shown if src.startswith("data:image/png;base64,")]
    assert len(set(previews)) >= 2, "the preview never changed"
    assert shown[-1].startswith("blob:"), "the final image is not the last one shown"
    assert "seed 7" in text_of(browser, "gen-status")
    link = by_id(browser, "download")
    assert link.is_displayed()
    assert link.get_attribute("download") == "limner-7.png"
    image = decode_png(downloaded_b64(browser, link.get_attribute("href")))
    assert image.size == (128, 128)
    assert image.text["prompt"] == "a lighthouse at dusk"  # type: ignore[attr-defined]
    assert image.text["seed"] == "7"  # type: ignore[attr-defined]
    assert image.text["model"] == TINY_FLUX  # type: ignore[attr-defined]
    shot(browser, "generated")
    assert console_errors(browser) == []


def test_stop_ends_a_generation_early(
    browser: Chrome, playground: Playground, wait_for: WaitFor
) -> None:
    total = 100  # the tiny FLUX's most: at least 5 s, far longer than a click takes
    open_page(browser, playground.served.url)
    fill(browser, {"prompt": "a long wait", "width": "128", "height": "128"})
    fill(browser, {"steps": str(total), "seed": "3"})
    record_images(browser)
    steps_before = playground.flux.steps_run
    by_id(browser, "generate-button").click()
    until(
        browser,
        lambda d: int(by_id(d, "gen-progress").get_attribute("value") or 0) >= 2,
        "the second step",
    )
    assert playground.served.pool(TINY_FLUX)["in_flight"] == 1
    shot(browser, "generating")
    by_id(browser, "stop-button").click()
    until(browser, lambda d: generation_state(d) == "stopped", "the page to stop")
    wait_for(
        lambda: playground.served.pool(TINY_FLUX)["in_flight"] == 0,
        timeout=30,
        what="the server to stop the generation",
    )
    steps_run = playground.flux.steps_run - steps_before
    assert steps_run < total, "the generation ran to its end"
    assert re.fullmatch(r"Stopped at step \d+ of 100\.", text_of(browser, "gen-status"))
    assert not any(src.startswith("blob:") for src in shown_images(browser))
    assert not by_id(browser, "download").is_displayed()
    assert by_id(browser, "generate-button").is_enabled()
    assert not by_id(browser, "stop-button").is_enabled()
    shot(browser, "stopped")
    assert console_errors(browser) == []


@contextlib.contextmanager
def viewport(driver: Chrome, width: int, height: int) -> Iterator[None]:
    """The page's viewport exactly ``width`` x ``height`` CSS pixels, for the block."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def in_viewport(driver: Chrome, element_id: str) -> bool:
    """Whether the element is shown and wholly inside the viewport, the page as it stands."""
    inside: bool = driver.execute_script(
        """
        const box = document.getElementById(arguments[0]).getBoundingClientRect();
        return box.height > 0 && box.top >= 0 && box.left >= 0
            && box.bottom <= window.innerHeight && box.right <= window.innerWidth;
        """,
        element_id,
    )
    return inside


def test_the_form_takes_its_limits_from_the_server(browser: Chrome, playground: Playground) -> None:
    with playground.served.client() as client:
        limits = client.get(f"/v1/models/{TINY_FLUX}").json()["limits"]
    assert limits["steps"]["max"] == 100  # the tiny FLUX checkpoint's, not the schema's 1000
    open_page(browser, playground.served.url)
    for field in ("width", "height", "steps"):
        shown = by_id(browser, field)
        expected = limits[field]
        assert shown.get_dom_attribute("min") == str(expected["min"]), field
        assert shown.get_dom_attribute("max") == str(expected["max"]), field
        assert shown.get_dom_attribute("step") == (
            None if expected["multiple"] is None else str(expected["multiple"])
        ), field
        assert shown.get_dom_attribute("placeholder") == f"default {expected['default']}", field

    steps_before = playground.flux.steps_run
    with viewport(browser, 1280, 900):
        fill(browser, {"prompt": "a lighthouse", "width": "", "height": "", "seed": ""})
        fill(browser, {"steps": "1000"})
        by_id(browser, "generate-button").click()
        error = by_id(browser, "gen-error")
        until(browser, lambda d: error.is_displayed(), "the limit to be named")
        assert error.text == f"Steps must be between 1 and 100 for {TINY_FLUX}; it is 1000."
        assert in_viewport(browser, "gen-error")
        assert by_id(browser, "steps") == browser.switch_to.active_element
        shot(browser, "limit-refused")

        fill(browser, {"steps": "4", "width": "100"})
        by_id(browser, "generate-button").click()
        until(browser, lambda d: "multiple of 16" in error.text, "the width's multiple")
        assert error.text == f"Width must be a multiple of 16 for {TINY_FLUX}; it is 100."
        assert in_viewport(browser, "gen-error")
    assert generation_state(browser) == "idle"  # nothing was sent
    assert playground.flux.steps_run == steps_before
    assert console_errors(browser) == []


def test_a_refused_generation_is_told_beside_the_button(
    browser: Chrome, playground: Playground
) -> None:
    open_page(browser, playground.served.url)
    with viewport(browser, 1280, 900):
        fill(browser, {"prompt": "   ", "width": "", "height": "", "steps": "", "seed": ""})
        by_id(browser, "generate-button").click()
        until(browser, lambda d: generation_state(d) == "failed", "the server's refusal")
        error = by_id(browser, "gen-error")
        assert error.is_displayed()
        assert "prompt" in error.text and "(400)" in error.text
        assert in_viewport(browser, "gen-error")
        button = by_id(browser, "generate-button").rect
        assert 0 <= error.rect["y"] - (button["y"] + button["height"]) < 100  # right under it
        shot(browser, "generation-refused")
    console_errors(browser)  # the refusal's 400


def test_an_undecodable_image_is_told_beside_the_search_button(
    browser: Chrome, playground: Playground, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature")
    open_page(browser, playground.served.url)
    with viewport(browser, 1280, 900):
        by_id(browser, "files").send_keys(str(broken))
        error = by_id(browser, "search-error")
        until(browser, lambda d: error.is_displayed(), "the search panel's error")
        assert error.text.startswith("broken.png: ")
        assert in_viewport(browser, "search-error")
        shot(browser, "search-refused")
    console_errors(browser)  # the refusal's 400


def test_docs_render_every_operation_with_no_network(
    browser: Chrome, playground: Playground
) -> None:
    console_errors(browser)
    browser.get(playground.served.url + "/docs")
    until(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock .opblock-summary-path"),
        "Swagger UI to render the operations",
    )
    shown = {
        (
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
        )
        for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")
    }
    with playground.served.client() as client:
        schema = client.get("/openapi.json").json()
    expected = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
    }
    assert ("POST", "/v1/embeddings") in expected
    assert shown == expected
    # Everything the page loaded came from this server.
    loaded: list[str] = browser.execute_script(
        "return performance.getEntriesByType('resource').map((entry) => entry.name)"
    )
    assert loaded and all(url.startswith(playground.served.url + "/") for url in loaded), loaded
    shot(browser, "docs")
    assert console_errors(browser) == []


# -- the Edit panel --


def edit_state(driver: Chrome) -> str:
    return by_id(driver, "edit").get_attribute("data-state") or ""


def record_edit_images(driver: Chrome) -> None:
    """Remember every image the edit panel shows, however briefly."""
    driver.execute_script(
        """
        const image = document.getElementById("edit-image");
        window.editImages = [];
        new MutationObserver(() => window.editImages.push(image.src))
            .observe(image, {attributes: true, attributeFilter: ["src"]});
        """
    )


def fetched_png(driver: Chrome, url: str) -> Image.Image:
    """What a blob: URL of the page holds, as an image."""
    return decode_png(downloaded_b64(driver, url))


def edit_source(path: Path) -> np.ndarray:
    pixels = np.random.default_rng(9).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_an_edit_inside_a_painted_mask_forms_step_by_step(
    browser: Chrome, playground: Playground, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    source = edit_source(tmp_path / "fox.png")
    open_page(browser, playground.served.url)
    by_id(browser, "edit-file").send_keys(str(tmp_path / "fox.png"))
    until(browser, lambda d: "64x48" in text_of(d, "edit-status"), "the image to load")
    assert by_id(browser, "edit-button").is_enabled()
    assert by_id(browser, "edit").get_attribute("data-masked") == "no"
    # A stroke across the middle of the image, on the mask painted over it.
    canvas = by_id(browser, "edit-mask")
    width = canvas.size["width"]
    strokes = ActionChains(browser).move_to_element_with_offset(canvas, -width // 6, 0)
    strokes.click_and_hold().move_by_offset(width // 3, 0).release().perform()
    assert by_id(browser, "edit").get_attribute("data-masked") == "yes"
    assert by_id(browser, "clear-mask").is_enabled()
    shot(browser, "edit-painted")
    fill(browser, {"edit-prompt": "a red hat", "strength": "1", "edit-steps": "6"})
    fill(browser, {"edit-seed": "5"})
    record_edit_images(browser)
    by_id(browser, "edit-button").click()
    until(browser, lambda d: edit_state(d) == "done", "the edited image", timeout=60)
    shown: list[str] = browser.execute_script("return window.editImages")
    previews = [src for src in shown if src.startswith("data:image/png;base64,")]
    assert len(set(previews)) >= 2, "the edit's preview never changed"
    assert shown[-1].startswith("blob:")
    assert "seed 5" in text_of(browser, "edit-status")
    link = by_id(browser, "edit-download")
    assert link.is_displayed() and link.get_attribute("download") == "limner-edit-5.png"
    edited = fetched_png(browser, link.get_attribute("href") or "")
    assert edited.size == (64, 48)
    pixels = np.asarray(edited.convert("RGB"))
    painted_png: str = browser.execute_script(
        "return document.getElementById('edit-mask').toDataURL('image/png')"
    )
    painted = decode_png(painted_png.split(",", 1)[1]).getchannel("A")
    stroke = np.asarray(painted) > 0  # what the page sent as the area to edit
    assert 0 < stroke.sum() < stroke.size / 2, "the stroke painted nothing, or everything"
    same = (pixels == source).all(axis=2)
    assert same[~stroke].all(), "a pixel outside the painted mask changed"
    assert not same[stroke].all(), "the painted area did not change"
    settings = json.loads(edited.text["limner"])  # type: ignore[attr-defined]
    assert settings["edit"] == "inpaint" and settings["strength"] == 1.0
    shot(browser, "edit-done")
    assert console_errors(browser) == []


def test_an_uploaded_mask_is_the_area_edited(
    browser: Chrome, playground: Playground, tmp_path: Path
) -> None:
    source = edit_source(tmp_path / "fox.png")
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 48))  # OpenAI's: transparent on the right half
    mask.save(tmp_path / "mask.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    open_page(browser, playground.served.url)
    by_id(browser, "edit-file").send_keys(str(tmp_path / "fox.png"))
    until(browser, lambda d: "64x48" in text_of(d, "edit-status"), "the image to load")
    by_id(browser, "mask-file").send_keys(str(tmp_path / "small.png"))
    until(browser, lambda d: by_id(d, "edit-error").is_displayed(), "the size to be refused")
    assert "must be the same size" in text_of(browser, "edit-error")
    by_id(browser, "mask-file").send_keys(str(tmp_path / "mask.png"))
    until(browser, lambda d: d.find_element(By.ID, "edit").get_attribute("data-masked") == "yes",
          "the mask to load")  # fmt: skip
    fill(browser, {"strength": "1", "edit-steps": "2", "edit-seed": "8"})
    by_id(browser, "edit-button").click()
    until(browser, lambda d: edit_state(d) == "done", "the edited image", timeout=60)
    edited = fetched_png(browser, by_id(browser, "edit-download").get_attribute("href") or "")
    pixels = np.asarray(edited.convert("RGB"))
    assert np.array_equal(pixels[:, :32], source[:, :32])  # kept, pixel for pixel
    assert not np.array_equal(pixels[:, 32:], source[:, 32:])
    shot(browser, "edit-uploaded-mask")
    assert console_errors(browser) == []


def solid_png(path: Path, colour: tuple[int, int, int], stripes: bool = False) -> Path:
    image = Image.new("RGB", (96, 96), colour)
    if stripes:
        for x in range(0, 96, 12):
            image.paste((255, 255, 255), (x, 0, x + 6, 96))
    image.save(path)
    return path


def data_url(path: Path) -> str:
    """As the browser's FileReader writes it for a .png file."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def test_a_text_query_reorders_three_images(
    browser: Chrome, playground: Playground, tmp_path: Path
) -> None:
    query = "a red fox in the snow"
    pictures = [
        solid_png(tmp_path / "red.png", (200, 30, 30)),
        solid_png(tmp_path / "stripes.png", (30, 90, 200), stripes=True),
        solid_png(tmp_path / "green.png", (40, 160, 60)),
    ]
    # The tiny CLIP's weights are random: the API itself says which order is right.
    with playground.served.client() as client:
        answer = client.post(
            "/v1/embeddings",
            json={"model": TINY_CLIP, "input": [*map(data_url, pictures), query]},
        ).json()
    vectors = np.array([row["embedding"] for row in answer["data"]])
    scores = vectors[:3] @ vectors[3]
    assert len(set(np.round(scores, 4))) == 3, "ties would make any order right"
    expected = [pictures[i].name for i in np.argsort(-scores)]
    dropped = list(reversed(expected))  # so the ranking must move the images
    by_name = {path.name: path for path in pictures}

    open_page(browser, playground.served.url)
    by_id(browser, "files").send_keys("\n".join(str(by_name[name]) for name in dropped))
    until(browser, lambda d: "3 images embedded" in text_of(d, "search-status"), "embeddings")
    assert names_shown(browser) == dropped
    shot(browser, "search-added")

    by_id(browser, "query").send_keys(query, Keys.ENTER)  # the keyboard, not the mouse
    until(browser, lambda d: "Ranked 3 images" in text_of(d, "search-status"), "the ranking")
    assert names_shown(browser) == expected
    shown_scores = [
        float(item.get_attribute("data-score") or "nan")
        for item in browser.find_elements(By.CSS_SELECTOR, "#results li")
    ]
    assert shown_scores == pytest.approx(sorted(scores, reverse=True), abs=1e-5)
    score_texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .score")]
    assert score_texts == [f"score {s:.3f}" for s in sorted(scores, reverse=True)]
    shot(browser, "search-ranked")
    assert console_errors(browser) == []


def names_shown(driver: Chrome) -> list[str]:
    return [
        item.get_attribute("data-name") or ""
        for item in driver.find_elements(By.CSS_SELECTOR, "#results li")
    ]


def test_with_an_api_key_the_page_fails_clearly_then_works(
    browser: Chrome, keyed_playground: Served, tmp_path: Path
) -> None:
    open_page(browser, keyed_playground.url)
    notice = by_id(browser, "connection")
    assert notice.is_displayed()
    assert "needs an API key" in notice.text
    assert not by_id(browser, "search-button").is_enabled()
    assert not by_id(browser, "files").is_enabled()
    assert by_id(browser, "api-key") == browser.switch_to.active_element  # type it right away
    shot(browser, "key-needed")
    refused = [entry["message"] for entry in console_errors(browser)]
    assert refused and all("401" in message for message in refused), refused

    assert text_of(browser, "key-state") == "Kept in this tab."
    browser.switch_to.active_element.send_keys("not-the-key", Keys.ENTER)
    until(browser, lambda d: "refused this API key" in text_of(d, "connection"), "a refusal")
    # Beside the refusal, the key's state says the same: never "set".
    assert text_of(browser, "key-state") == "Key refused: not this server's."
    assert by_id(browser, "forget-key").is_displayed()
    shot(browser, "key-refused")
    console_errors(browser)  # the refusal's 401

    by_id(browser, "api-key").send_keys(KEY, Keys.ENTER)
    until(browser, connected, "the key to be accepted")
    assert not by_id(browser, "connection").is_displayed()
    assert by_id(browser, "search-button").is_enabled()
    assert "Key set for this tab" in text_of(browser, "key-state")
    by_id(browser, "files").send_keys(str(solid_png(tmp_path / "one.png", (10, 20, 30))))
    until(browser, lambda d: "1 images embedded" in text_of(d, "search-status"), "an embedding")
    until(browser, lambda d: "1 loaded" in text_of(d, "pool-summary"), "the pool", timeout=10)
    shot(browser, "key-accepted")

    browser.refresh()  # the key outlives a reload of the tab
    until(browser, connected, "the page to reconnect with the kept key")
    assert console_errors(browser) == []


# -- LoRA adapters in the page ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_playground(serve: Serve, hf_cache: Path, lora_dir: Path) -> Iterator[Served]:
    """The tiny FLUX and SD3.5 with the session's adapters, served with the page."""
    limner_flux = pytest.importorskip("limner_flux")
    limner_sd35 = pytest.importorskip("limner_sd35")
    registry = Registry(entry_points=False, lora_dirs=[lora_dir])
    registry.register_plugin(limner_flux)
    registry.register_plugin(limner_sd35)
    with serve(create_app(registry=registry, settings=ServerSettings()), registry) as served:
        yield served


def adapters_listed(driver: Chrome) -> list[str]:
    return [
        row.get_attribute("data-name") or ""
        for row in driver.find_elements(By.CSS_SELECTOR, "#lora-list li")
    ]


def test_the_page_lists_the_models_adapters_and_sends_the_ticked_ones(
    browser: Chrome, lora_playground: Served
) -> None:
    open_page(browser, lora_playground.url)
    assert connected(browser), text_of(browser, "connection")
    model = Select(by_id(browser, "gen-model"))
    model.select_by_value(TINY_FLUX)
    until(browser, lambda d: adapters_listed(d) == ["ink", "oil"], "FLUX's adapters")
    assert by_id(browser, "loras").is_displayed()
    model.select_by_value("limner/tiny-sd35")
    until(browser, lambda d: adapters_listed(d) == ["moss", "tea"], "SD3.5's adapters")
    model.select_by_value(TINY_FLUX)
    until(browser, lambda d: adapters_listed(d) == ["ink", "oil"], "FLUX's adapters again")

    by_id(browser, "lora-ink").click()
    scale = browser.find_element(
        By.CSS_SELECTOR, '#lora-list li[data-name="ink"] input[type="number"]'
    )
    scale.clear()
    scale.send_keys("0.8")
    fill(browser, {"prompt": "a lighthouse", "width": "32", "height": "32"})
    fill(browser, {"steps": "2", "seed": "7"})
    by_id(browser, "generate-button").click()
    until(browser, lambda d: generation_state(d) == "done", "the image", timeout=60)
    shot(browser, "loras")
    image = decode_png(downloaded_b64(browser, by_id(browser, "download").get_attribute("href")))
    settings = json.loads(image.text["limner"])  # type: ignore[attr-defined]
    assert settings["loras"] == [["ink", 0.8]]
    body = {"model": TINY_FLUX, "prompt": "a lighthouse", "size": "32x32", "steps": 2, "seed": 7}
    with lora_playground.client() as client:
        inked = client.post(
            "/v1/images/generations", json={**body, "loras": [{"name": "ink", "scale": 0.8}]}
        ).json()
        plain = client.post("/v1/images/generations", json=body).json()
    page = np.asarray(image.convert("RGB"))
    assert np.array_equal(page, np.asarray(decode_png(inked["data"][0]["b64_json"]).convert("RGB")))
    assert not np.array_equal(
        page, np.asarray(decode_png(plain["data"][0]["b64_json"]).convert("RGB"))
    )
    assert console_errors(browser) == []
