"""``edgefleet tail TOPIC-FILTER...``: what crosses the broker, decoded, one JSON line per
message (:mod:`edgefleet.tail`). It reads with a read-only account (``watcher`` by
default; ``--account dashboard`` goes over WebSockets), so it sees what dashboards see
and can never publish."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

from broker.session import Session
from edgefleet.home import WATCHER
from edgefleet.modelcli import Commands
from edgefleet.tail import (
    DEFAULT_MAX_LINE,
    MIN_MAX_LINE,
    Renderer,
    TailOptions,
    follow,
    parse_duration,
)
from edgefleet.viewcli import home_of
from schemas import RejectedError
from schemas.topics import check_name, scoped

__all__ = ["EXIT_SHORT", "add_tail_command"]

EXIT_SHORT = 1
"""``--count N`` with ``--timeout``: fewer than N lines came in time."""


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _filter(text: str) -> str:
    try:
        return scoped(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive whole number, got {text[:20]!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _tail(args: argparse.Namespace) -> int:
    home = home_of(args)
    account = check_name(args.account, "account name")
    options = TailOptions(raw=args.raw, since_s=args.since, max_line=args.max_line)
    now = time.time()
    try:
        renderer = Renderer(home.root_public_keys(), home.trust(), options, now=now)
    except RejectedError as exc:
        print(
            f"edgefleet: the home's trust does not verify ({exc}); signed documents show"
            " as unverified",
            file=sys.stderr,
        )
        renderer = Renderer(home.root_public_keys(), None, options, now=now)
    session = Session(home.service_endpoint(account), client_id=account)

    async def go() -> int:
        shown = 0
        async with session, contextlib.aclosing(follow(session, args.filters, renderer)) as lines:
            try:
                async with asyncio.timeout(args.timeout or None):
                    async for line in lines:
                        print(line, flush=True)
                        shown += 1
                        if shown == args.count:
                            return 0
            except TimeoutError:
                return EXIT_SHORT if args.count else 0
        return EXIT_SHORT

    try:
        return asyncio.run(go())
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit flush from
        # failing on the closed pipe too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def add_tail_command(sub: Commands[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tail",
        help="follow topics, decoded, as JSON lines (retained first); read-only",
        description=(
            "Print every message on the topics matching the filters as one JSON line: "
            "topic, retained, received_at, channel, and the message decoded (a signed "
            "document with its signers and whether they verify against the home's trust), "
            "or an error with its reason. Filters not under fleet/v1 are taken under it: "
            "'devices/+/telemetry', 'rollouts/#', '#'."
        ),
    )
    p.add_argument("filters", nargs="+", type=_filter, metavar="TOPIC-FILTER")
    p.add_argument(
        "--account",
        default=WATCHER,
        help="the home's account to read with (default: watcher, read-only; one session each)",
    )
    raw = p.add_mutually_exclusive_group()
    raw.add_argument(
        "--raw",
        action="store_const",
        const="base64",
        help="the payload's bytes in base64 instead of the decoded message",
    )
    raw.add_argument(
        "--hex", dest="raw", action="store_const", const="hex", help="as --raw, in hex"
    )
    p.add_argument(
        "--since",
        type=_duration,
        metavar="DURATION",
        help="skip messages whose own time is older (90s, 15m, 2h, 1d); retained ones too",
    )
    p.add_argument("--count", type=_positive, help="stop after this many lines")
    p.add_argument(
        "--timeout", type=float, default=0.0, help="stop after this many seconds (exit 1 short)"
    )
    p.add_argument(
        "--max-line",
        type=int,
        default=DEFAULT_MAX_LINE,
        help=f"characters of a line at most, a longer message cut (at least {MIN_MAX_LINE})",
    )
    p.set_defaults(func=_tail)
