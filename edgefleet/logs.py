"""How the ``edgefleet`` processes log: text for people, or JSON lines on request
(``--log-format json``) for journald and log shippers."""

from __future__ import annotations

import json
import logging
from typing import Final

from schemas.errors import bound_text

__all__ = ["MAX_LOG_CHARS", "JsonFormatter", "configure_logging"]

MAX_LOG_CHARS: Final = 4000
"""A log record's message (and its traceback) as far as a JSON line carries it."""

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (Unix time), ``level``, ``logger``, ``msg`` and,
    for an exception, ``exc``. Texts are bounded: a message built from input stays one
    bounded line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": bound_text(record.getMessage(), MAX_LOG_CHARS),
        }
        if record.exc_info:
            line["exc"] = bound_text(self.formatException(record.exc_info), MAX_LOG_CHARS)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: int, log_format: str) -> None:
    """Log to stderr at ``level``, as ``text`` or ``json``, replacing earlier handlers."""
    handler = logging.StreamHandler()
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
