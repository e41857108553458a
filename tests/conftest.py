"""Fixtures for every test."""

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _cli_log_handler_removed() -> Iterator[None]:
    """A CLI run in-process installs a plain stream handler on the stderr pytest captured
    for that test, which is closed once the test ends: a later test's log records would
    meet a closed stream ("--- Logging error ---"). It goes when the test ends, and the
    root level it set goes with it. (pytest's own handlers are subclasses, left alone.)"""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
            root.setLevel(level)
