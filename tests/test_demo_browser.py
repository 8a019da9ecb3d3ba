"""The demo page end to end in headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; nothing downloads a browser): upload a demo photo through the file input and read
the caption off the page; an over-size file and a non-image show their errors on the page.

Skipped with a reason when Chromium or Playwright is missing, except under CI=true, where
that is a failure (CI installs both)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_demo import LIMIT, REPO, http_server

from captioner import Captioner
from demo import screenshot

pytestmark = pytest.mark.browser
PHOTO = REPO / "demo" / "images" / "chelsea.jpg"


def require_browser() -> None:
    """Skip (fail under CI) unless Debian's chromium and the playwright package are here."""
    missing = screenshot.browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run under CI: needs {missing}")
        pytest.skip(f"needs {missing}")


@pytest.fixture(scope="module")
def site(tiny_model_file):
    """(demo URL, browser page factory) around one server and one Chromium for the module."""
    require_browser()
    captioner = Captioner.load(tiny_model_file, device="cpu")
    server = http_server.make_server(captioner, "127.0.0.1", 0, max_upload_bytes=LIMIT, quiet=True)
    with http_server.serving(server) as url, screenshot.chromium_page() as page:
        page.set_default_timeout(60_000)
        yield screenshot, url, page, captioner


def upload(page, url: str, path: Path) -> None:
    page.goto(url)
    page.wait_for_selector("#app[data-ready='true']")
    page.set_input_files("#file", str(path))


def wait_for_error(page) -> str:
    page.wait_for_selector("#error:not([hidden])")
    assert page.is_hidden("#result")
    return page.inner_text("#error")


def test_upload_shows_caption_alternatives_timings_and_attention(site):
    app, url, page, captioner = site
    caption = app.caption_in_page(page, url, PHOTO)
    [expected] = captioner.caption(PHOTO, beam_size=3, n_best=3)  # the page's default beam
    assert caption == expected.caption
    assert page.locator("#alternatives tbody tr").count() == 3
    assert page.locator("#timings tbody tr").count() == 6
    assert "encoder" in page.inner_text("#timings") and " ms" in page.inner_text("#timings")
    # Step through the words: each shows its own heatmap over the image.
    words = page.locator("#words button")
    assert words.count() >= len(expected.words)
    assert "word 1 of" in page.inner_text("#step-info")
    page.click("#next")
    assert "word 2 of" in page.inner_text("#step-info")
    words.nth(0).click()
    assert words.nth(0).get_attribute("aria-pressed") == "true"
    assert page.eval_on_selector("#canvas", "c => c.width > 0 && c.height > 0")
    assert page.is_hidden("#error")


def test_non_image_shows_the_reason(site, tmp_path):
    _, url, page, _ = site
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is a text file with a .jpg name\n")
    upload(page, url, fake)
    assert "not an image file" in wait_for_error(page)


def test_over_size_upload_shows_the_limit(site, tmp_path):
    _, url, page, _ = site
    big = tmp_path / "big.jpg"
    big.write_bytes(PHOTO.read_bytes() + b"\0" * LIMIT)
    upload(page, url, big)
    assert "too large" in wait_for_error(page)


def test_server_side_413_reaches_the_page(site, tmp_path):
    """With the page's own size check switched off, the server's 413 (its wording names the
    limit in bytes) still reaches the page instead of a reset connection."""
    _, url, page, _ = site
    big = tmp_path / "big.jpg"
    big.write_bytes(PHOTO.read_bytes() + b"\0" * LIMIT)
    page.goto(url)
    page.wait_for_selector("#app[data-ready='true']")
    page.evaluate("state.maxUpload = 0")
    page.set_input_files("#file", str(big))
    message = wait_for_error(page)
    assert "upload too large" in message and f"{LIMIT:,} bytes" in message
