"""A real headless Chromium (Debian's ``chromium`` package) driven by Playwright, for
the dashboard's tests: a fresh profile each time, no network of its own (no component
updates, sync or QUIC), and the page's console errors collected."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
from playwright.async_api import Page, async_playwright

CHROMIUM: Final = Path("/usr/bin/chromium")
FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)


def need_chromium() -> None:
    """Fail (not skip) without the browser: scripts/setup.sh installs it."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium")


@dataclass
class Browser:
    page: Page
    errors: list[str] = field(default_factory=list)
    """Uncaught errors and console errors of the page."""


@contextlib.asynccontextmanager
async def chromium(url: str, *, width: int = 1400, height: int = 1000) -> AsyncIterator[Browser]:
    """A page of a fresh headless Chromium at ``url``."""
    need_chromium()
    profile = tempfile.mkdtemp(prefix="edgefleet-chromium-")
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=list(FLAGS),
                viewport={"width": width, "height": height},
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                browser = Browser(page)
                page.on("pageerror", lambda exc: browser.errors.append(str(exc)))
                page.on(
                    "console",
                    lambda msg: browser.errors.append(msg.text) if msg.type == "error" else None,
                )
                await page.goto(url)
                yield browser
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
