"""Headless Chromium for the browser tests: finding it, launching it, a fresh page."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from playwright.sync_api import Browser, Page, sync_playwright

from . import programs

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
TIMEOUT_MS = 15_000


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium ($PGWS_CHROMIUM, else ``chromium`` on PATH), closed afterwards;
    skips the test when there is none."""
    executable = programs.require("chromium", "PGWS_CHROMIUM")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def fresh_page(browser: Browser) -> Iterator[Page]:
    """A page in a context of its own (no cookies or storage shared), closed afterwards."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        yield page
    finally:
        context.close()
