"""Debian's Chromium, headless, driven by Playwright (for the browser tests and the README screenshot).

No browser is downloaded: Playwright is pointed at the system's ``chromium`` (``apt-get install
chromium``; ``DIFFLO_CHROMIUM`` overrides the path). :func:`why_not` says why a browser cannot run
here, or returns None.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str | None:
    env = os.environ.get("DIFFLO_CHROMIUM")
    if env:
        return env if os.path.exists(env) else None
    for p in CANDIDATES:
        if os.path.exists(p):
            return p
    return shutil.which("chromium") or shutil.which("chromium-browser")


def why_not() -> str | None:
    """None if Playwright and a Chromium are installed, else the reason."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; no browser download is needed)"
    if chromium_path() is None:
        return "no chromium found (apt-get install chromium, or set DIFFLO_CHROMIUM)"
    return None


@contextmanager
def launch():
    """Headless Chromium (the system's), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, width: int = 1200, height: int = 900):
    """A page in a fresh context; ``page.js_errors`` collects uncaught script errors. ``bypass_csp``:
    the page's Content-Security-Policy forbids eval, which Playwright's wait_for_function needs; the
    page itself is unchanged."""
    context = browser.new_context(viewport={"width": width, "height": height}, bypass_csp=True)
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda e: page.js_errors.append(str(e)))
    return page
