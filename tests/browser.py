"""Headless Chromium for the browser tests: finding it, launching it, a fresh page."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator, Optional

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
TIMEOUT_MS = 15_000


def find_chromium() -> Optional[str]:
    """$PGWS_CHROMIUM, else Debian's /usr/bin/chromium, else ``chromium`` on PATH."""
    configured = os.environ.get("PGWS_CHROMIUM")
    if configured:
        return configured
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium, closed afterwards; skips the test when there is none."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium: install the chromium package (Debian: apt-get install chromium) "
                    "or point PGWS_CHROMIUM at a Chromium binary")
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
