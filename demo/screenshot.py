"""The demo page in Debian's headless Chromium, driven by Playwright (which downloads
nothing): for `python demo/app.py --screenshot` and the browser tests."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from demo.http_server import make_server, serving

CHROMIUM = "/usr/bin/chromium"
# Headless, with everything that would phone home switched off.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_missing() -> str | None:
    """What is missing for a headless page (None when Chromium and Playwright are here)."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium_page(width: int = 1100, height: int = 900) -> Iterator[Any]:
    """A fresh page in headless Chromium, closed with the block."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def caption_in_page(page: Any, url: str, image: str | os.PathLike[str], timeout_ms: int = 60_000) -> str:
    """Open the demo, upload `image` through the file input, and return the caption shown."""
    page.goto(url)
    page.wait_for_selector("#app[data-ready='true']", timeout=timeout_ms)
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#result:not([hidden])", timeout=timeout_ms)
    return page.inner_text("#caption")


def take_screenshot(captioner: Any, out: str | os.PathLike[str], image: str | os.PathLike[str]) -> str:
    """Caption `image` in the real page and save a PNG of it; returns the caption."""
    server = make_server(captioner, "127.0.0.1", 0, quiet=True)
    server.service.warm_up()
    with serving(server) as url, chromium_page() as page:
        caption = caption_in_page(page, url, image)
        if page.is_visible("#next"):  # attention models: show the second word's heatmap
            page.click("#next")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
    return caption
