"""The HTML demo in a real headless Chromium (Debian's), against a real gunicorn server.

Screenshots go to test-artifacts/ at the repository root.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import API_KEY, ROOT, wait_for
from webapp.model import scenes

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
# Flags for a closed network: without the background-networking ones Chromium keeps dialling out.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium (README test command)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url, **context_options) -> Page:
    context = browser.new_context(accept_downloads=True, **context_options)
    page = context.new_page()
    page.goto(url)
    return page


def downloaded_png(page: Page) -> bytes:
    """Click the image's download link, as a person would, and return the file's bytes."""
    with page.expect_download() as download:
        page.click("#results a[download]")
    return Path(download.value.path()).read_bytes()


def test_a_person_generates_an_image_and_watches_the_progress(browser, ready_server):
    page = open_page(browser, ready_server.url + "/", viewport={"width": 1280, "height": 900})
    console_errors = []
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)

    expect(page.locator("#workers li.state-ready")).to_have_count(2, timeout=30_000)
    expect(page.locator("#health-summary")).to_contain_text("Ready")
    expect(page.locator("#generate-button")).to_be_enabled()

    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#num_inference_steps", "12")
    page.fill("#width", "96")
    page.fill("#height", "64")
    page.uncheck("#random_seed")
    page.fill("#seed", "42")
    page.click("#generate-button")

    expect(page.locator("#progress-box")).to_be_visible()
    expect(page.locator("#results img")).to_have_count(1, timeout=60_000)
    assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [12, 12]
    expect(page.locator("#progress-text")).to_have_text("step 12 of 12")
    expect(page.locator("#results figcaption")).to_contain_text("seed 42")
    expect(page.locator("#results a[download]")).to_have_attribute("download", "seed-42.png")

    assert page.eval_on_selector("#results img", "img => [img.naturalWidth, img.naturalHeight]") == [96, 64]
    with Image.open(io.BytesIO(downloaded_png(page))) as image:
        assert image.format == "PNG"
        assert image.size == (96, 64)
    page.screenshot(path=str(ARTIFACTS / "demo-generated.png"), full_page=True)
    assert console_errors == []


def test_a_person_runs_a_job_reloads_the_page_and_finds_the_image_again(browser, ready_server):
    """Run as a job (docs/api.md, Asynchronous jobs), the image outlives the page: a reload follows the kept
    job's id and shows the same picture."""
    page = open_page(browser, ready_server.url + "/")
    expect(page.locator("#generate-button")).to_be_enabled(timeout=30_000)
    page.fill("#prompt", "a blue square")
    page.fill("#num_inference_steps", "6")
    page.uncheck("#random_seed")
    page.fill("#seed", "77")
    page.check("#as_job")
    page.click("#generate-button")
    expect(page.locator("#results figcaption")).to_contain_text("seed 77", timeout=60_000)
    expect(page.locator("#job-text")).to_contain_text("succeeded")
    job_id = page.evaluate("localStorage.getItem('job_id')")
    assert job_id.startswith("job_")
    first = downloaded_png(page)

    page.reload()
    expect(page.locator("#results figcaption")).to_contain_text("seed 77", timeout=30_000)
    expect(page.locator("#job-text")).to_have_text(f"job {job_id}: succeeded")
    assert downloaded_png(page) == first


def test_a_person_clicks_an_example_and_gets_the_scene_it_names_drawn_large_and_sharp(browser, ready_server):
    page = open_page(browser, ready_server.url + "/", viewport={"width": 1280, "height": 900})
    expect(page.locator("#workers li.state-ready")).to_have_count(2, timeout=30_000)
    examples = page.locator("a.example:not([data-lora])")
    expect(examples).to_have_count(len(scenes.EXAMPLES))
    examples.first.click()
    expect(page.locator("#prompt")).to_have_value(scenes.EXAMPLES[0])
    assert page.url == ready_server.url + "/", "the click filled the prompt instead of following the link"
    page.uncheck("#random_seed")
    page.fill("#seed", "7")
    page.click("#generate-button")
    expect(page.locator("#results img")).to_have_count(1, timeout=60_000)

    shown = page.eval_on_selector(
        "#results img",
        "img => [img.naturalWidth, img.getBoundingClientRect().width, getComputedStyle(img).imageRendering]",
    )
    assert shown == [64, 256, "pixelated"]
    with Image.open(io.BytesIO(downloaded_png(page))) as image:
        assert scenes.analyze(image) == scenes.parse(scenes.EXAMPLES[0])
    # The README shows this one (docs/demo-example.png is a copy of it).
    page.locator("main").screenshot(path=str(ARTIFACTS / "demo-example.png"))


def set_strength(page: Page, value: float) -> None:
    page.eval_on_selector(
        "#strength", "(slider, value) => { slider.value = value; slider.dispatchEvent(new Event('input')); }", value
    )


def test_a_person_edits_a_result_then_an_uploaded_file(browser, ready_server):
    page = open_page(browser, ready_server.url + "/", viewport={"width": 1280, "height": 900})
    console_errors = []
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    expect(page.locator("#generate-button")).to_be_enabled(timeout=30_000)
    expect(page.locator("#edit-box")).to_be_visible()
    page.fill("#prompt", "a red circle on a white background")
    page.uncheck("#random_seed")
    page.fill("#seed", "7")
    page.click("#generate-button")
    expect(page.locator("#results img")).to_have_count(1, timeout=60_000)
    with Image.open(io.BytesIO(downloaded_png(page))) as image:
        assert scenes.analyze(image) == scenes.Verdict("white", "red", "circle")

    page.click("#results button.edit-this")  # the result goes back in as the image to edit
    expect(page.locator("#input-preview")).to_be_visible()
    expect(page.locator("#input-name")).to_have_text("seed 7")
    page.fill("#prompt", "a blue circle on a white background")
    set_strength(page, 0.5)
    expect(page.locator("#strength-value")).to_have_text("0.5")
    page.click("#generate-button")
    expect(page.locator("#progress-text")).to_have_text("step 10 of 10", timeout=60_000)  # half of 20 steps
    # The first result's caption also says "seed 7": wait for the edit's own caption, which replaces it,
    # before downloading, or the download can race the "done" event and fetch the red original.
    expect(page.locator("#results figcaption")).to_contain_text("seed 7 · edited from 64x64, strength 0.5")
    with Image.open(io.BytesIO(downloaded_png(page))) as image:
        assert scenes.analyze(image) == scenes.Verdict("white", "blue", "circle")
    page.screenshot(path=str(ARTIFACTS / "demo-edit.png"), full_page=True)

    wide = io.BytesIO()
    Image.new("RGB", (300, 64), (255, 0, 0)).save(wide, format="PNG")
    page.set_input_files("#image", files=[{"name": "wide.png", "mimeType": "image/png", "buffer": wide.getvalue()}])
    expect(page.locator("#input-name")).to_have_text("wide.png")  # read by the page, and shown
    page.click("#generate-button")  # drawn at the form's 64x64, and the answer says from what
    expect(page.locator("#results figcaption")).to_contain_text("edited from 300x64", timeout=60_000)
    assert page.eval_on_selector("#results img", "img => [img.naturalWidth, img.naturalHeight]") == [64, 64]

    assert console_errors == []  # before the refusal below, which Chromium logs as a failed load

    renamed = [{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image at all"}]
    page.set_input_files("#image", files=renamed)
    expect(page.locator("#input-name")).to_have_text("notes.png")
    page.click("#generate-button")
    expect(page.locator('[data-error-for="image"]')).to_contain_text("image: must be a PNG, JPEG or WebP image")
    page.click("#clear-input")
    expect(page.locator("#input-box")).to_be_hidden()


def test_a_person_picks_the_shipped_adapter_and_gets_what_it_teaches(browser, ready_server):
    page = open_page(browser, ready_server.url + "/", viewport={"width": 1280, "height": 900})
    expect(page.locator("#generate-button")).to_be_enabled(timeout=30_000)
    page.click("a.example[data-lora='night']")  # fills the prompt and picks the adapter
    expect(page.locator("#prompt")).to_have_value(scenes.ADAPTER_EXAMPLES["night"])
    expect(page.locator("#lora")).to_have_value("night")
    page.uncheck("#random_seed")
    page.fill("#seed", "7")
    page.click("#generate-button")
    expect(page.locator("#results img")).to_have_count(1, timeout=60_000)
    with Image.open(io.BytesIO(downloaded_png(page))) as image:
        assert scenes.analyze(image).background == "black"


def test_without_javascript_an_example_link_fills_the_prompt(ready_server):
    response = ready_server.get("/", params={"prompt": scenes.EXAMPLES[1]})
    assert response.status_code == 200
    assert f">{scenes.EXAMPLES[1]}</textarea>" in response.text


def test_a_bad_value_shows_its_error_next_to_the_field(browser, ready_server):
    page = open_page(browser, ready_server.url + "/", viewport={"width": 1280, "height": 900})
    expect(page.locator("#generate-button")).to_be_enabled(timeout=30_000)
    page.fill("#prompt", "    ")  # passes the browser's own 'required' check; the server says why it is bad
    page.click("#generate-button")
    error = page.locator('[data-error-for="prompt"]')
    expect(error).to_have_text("prompt: must not be empty")
    expect(page.locator("#prompt")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#results img")).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "demo-error.png"), full_page=True)


def test_the_form_works_without_javascript(browser, ready_server):
    page = open_page(browser, ready_server.url + "/", java_script_enabled=False, viewport={"width": 390, "height": 844})
    expect(page.locator("#workers li.state-ready")).to_have_count(2)  # rendered by the server
    page.fill("#prompt", "a small boat")
    page.fill("#num_inference_steps", "2")
    page.click("#generate-button")
    expect(page.locator("#results img")).to_have_count(1, timeout=60_000)
    src = page.get_attribute("#results img", "src")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
        assert image.size == (64, 64)
    page.screenshot(path=str(ARTIFACTS / "demo-no-javascript-phone.png"), full_page=True)


def test_the_page_sends_a_content_security_policy_and_loads_nothing_from_elsewhere(ready_server):
    response = ready_server.get("/")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "http://" not in response.text.replace(ready_server.url, "") and "https://" not in response.text


def test_while_the_model_loads_the_panel_says_so_and_the_button_explains_itself(browser, start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server(WEB_CONCURRENCY="1", MODEL_LOADER="tests.loaders:gated", GATE_FILE=str(gate))

    wait_for(lambda: server.get("/healthz").status_code == 200, 60, "the port to answer")
    page = open_page(browser, server.url + "/", viewport={"width": 1280, "height": 900})
    expect(page.locator("#workers li.state-loading")).to_contain_text("attempt 1/5", timeout=30_000)
    expect(page.locator("#generate-button")).to_be_disabled()
    expect(page.locator("#button-hint")).to_contain_text("No worker is ready yet")
    expect(page.locator("#health-summary")).to_contain_text("Not ready")
    page.screenshot(path=str(ARTIFACTS / "demo-loading.png"), full_page=True)

    gate.touch()
    expect(page.locator("#workers li.state-ready")).to_have_count(1, timeout=120_000)
    expect(page.locator("#generate-button")).to_be_enabled()
    expect(page.locator("#button-hint")).to_have_text("")


def test_a_server_that_needs_a_key_asks_for_it_and_the_tab_keeps_it(browser, keyed_server):
    page = open_page(browser, keyed_server.url + "/", viewport={"width": 1280, "height": 900})
    expect(page.locator("#generate-button")).to_be_enabled(timeout=30_000)
    page.fill("#prompt", "a lighthouse")
    page.fill("#num_inference_steps", "2")
    page.fill("#api_key", "a-wrong-key")
    page.click("#generate-button")
    expect(page.locator('[data-error-for="api_key"]')).to_have_text("the API key is not valid")
    expect(page.locator("#api_key")).to_have_attribute("aria-invalid", "true")

    page.fill("#api_key", API_KEY)
    page.click("#generate-button")
    expect(page.locator("#results img")).to_have_count(1, timeout=60_000)
    page.reload()
    expect(page.locator("#api_key")).to_have_value(API_KEY)  # kept in this tab's sessionStorage
    page.screenshot(path=str(ARTIFACTS / "demo-api-key.png"), full_page=True)

    other = open_page(browser, keyed_server.url + "/")  # another tab's storage: the key is not there
    expect(other.locator("#api_key")).to_have_value("")


def test_the_page_of_an_open_server_has_no_key_field(ready_server):
    assert 'id="api_key"' not in ready_server.get("/").text
