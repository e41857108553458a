"""The ``edgefleet`` command line.

A device runs ``edgefleet agent ...`` on the base install: for those commands this
module builds a parser of the agent's commands only (:mod:`edgefleet.agentcli`), so
nothing of the model toolchain or the coordinator is imported. Every other command
comes from :mod:`edgefleet.commands`, which needs the ``coordinator`` extra; without it
they say what to install.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from broker.launcher import BrokerError
from broker.session import TransportError
from edgefleet.agentcli import add_agent_commands
from edgefleet.logs import configure_logging
from schemas import EdgefleetError
from schemas.errors import bound_text

__all__ = ["main"]

_ERROR_CHARS = 300
"""An input error is reported as one line of at most this many characters."""


_OURS = frozenset({"agent", "broker", "coordinator", "edgefleet", "models", "schemas", "storage"})


class _MissingExtraError(Exception):
    def __init__(self, module: str) -> None:
        super().__init__(
            f"this command needs the operator's and the cloud's parts ({module} is missing):"
            " pip install 'edgefleet[coordinator]'; a device needs only `edgefleet agent`"
        )


def _root_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--home",
        default=os.environ.get("EDGEFLEET_HOME", ".edgefleet"),
        help="fleet home with keys and enrollments (default: $EDGEFLEET_HOME or ./.edgefleet)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text (the default) or one JSON object a line",
    )
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv``, past the root options (None: there is none)."""
    words = iter(argv)
    for word in words:
        if word in ("--home", "--log-format"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: the agent's commands alone when that is what it runs.

    Raises:
        _MissingExtraError: another command, and the extra it needs is not installed.
    """
    parser = _root_parser()
    sub = parser.add_subparsers(required=True, metavar="command")
    command = _command_of(argv)
    if command != "agent":
        try:
            from edgefleet.commands import add_commands  # noqa: PLC0415 (not on a device)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] in _OURS:
                raise  # a module of ours is missing: a broken install, not an extra
            if command is not None:
                raise _MissingExtraError(exc.name) from exc
            # `edgefleet --help` on a device: its own commands.
        else:
            add_commands(sub)
    add_agent_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = _parser(argv)
    except _MissingExtraError as exc:
        print(f"edgefleet: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    configure_logging(logging.INFO if args.verbose else logging.WARNING, args.log_format or "text")
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (EdgefleetError, BrokerError, TransportError, OSError, ValueError) as exc:
        # ValueError covers pydantic's ValidationError, check_name and malformed files.
        print(f"edgefleet: {_one_line(exc)}", file=sys.stderr)
        return 2
    return code


def _one_line(exc: BaseException) -> str:
    """An error as one bounded line: pydantic's first complaint, not its whole dump."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or exc.title
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        text = f"invalid {where}: {first['msg']}{more}"
    else:
        text = str(exc) or type(exc).__name__
    text = re.sub(r"\s+", " ", text).strip()
    return bound_text(text, _ERROR_CHARS)


if __name__ == "__main__":
    sys.exit(main())
