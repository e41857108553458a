"""A real headless Chromium (Debian's ``chromium`` package) driven by Playwright, for
the dashboard's tests: a fresh profile each time, no network of its own (no component
updates, sync or QUIC), and the page's console errors collected."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

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
    """Fail (not skip) without the browser: scripts/test.sh installs it."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium")


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


async def until(page: Page, expression: str, *, what: str, timeout: float = 90.0) -> Any:
    """The first truthy value of ``expression`` in the page, polled (the page's CSP
    refuses the eval that ``page.wait_for_function`` polls with). A hang guard only."""
    deadline = time.monotonic() + timeout
    while True:
        value = await page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g} s waiting for {what}"
            raise AssertionError(msg)
        await asyncio.sleep(0.1)
