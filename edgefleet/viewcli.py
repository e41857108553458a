"""What operators read, with the read-only ``watcher`` account or the coordinator's audit
log: ``rollout status``, ``rollout list``, ``fleet ls`` and ``audit``. Every command takes
``--json``; exit codes say the outcome."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

from rich.live import Live

from broker.session import Session
from coordinator.audit import AUDIT_FILENAME, read_audit
from coordinator.operator import DeviceRow, list_statuses, read_fleet, read_status, watch_status
from edgefleet.home import WATCHER, Home
from edgefleet.modelcli import Commands
from edgefleet.statusview import PlainWatch, rich_table, status_line, status_text
from models.report import text_table
from schemas import Phase, RolloutStatus
from schemas.errors import bound_text
from schemas.topics import check_name

__all__ = ["EXIT_FAILED", "add_rollout_views", "add_view_commands", "home_of", "watcher"]


def home_of(args: argparse.Namespace) -> Home:
    """The fleet home the command line names (``--home``)."""
    return Home(Path(args.home))


def watcher(home: Home) -> Session:
    """A read-only account, so reading a status never displaces the operator's session."""
    return Session(home.service_endpoint(WATCHER), client_id=WATCHER)


EXIT_FAILED = 3
"""``rollout status``: the rollout ended rolled back or rejected."""


def _outcome(status: RolloutStatus) -> int:
    """The exit code a status stands for: 0, or :data:`EXIT_FAILED` for a failed end."""
    return EXIT_FAILED if status.phase in (Phase.ROLLED_BACK, Phase.REJECTED) else 0


def _rollout_status(args: argparse.Namespace) -> int:
    home = home_of(args)
    check_name(args.rollout_id, "rollout id")

    async def go() -> int:
        async with watcher(home) as session:
            if not args.watch:
                status = await read_status(session, args.rollout_id)
                if status is None:
                    print(f"no status for {args.rollout_id}", file=sys.stderr)
                    return 1
                print(_as_json(status) if args.json else status_text(status))
                return _outcome(status)
            try:
                async with asyncio.timeout(args.timeout or None):
                    return await _watch(session, args.rollout_id, as_json=args.json)
            except TimeoutError:
                print(f"{args.rollout_id}: not final after {args.timeout:g} s", file=sys.stderr)
        return 1

    return asyncio.run(go())


def _as_json(status: RolloutStatus) -> str:
    return json.dumps(status.model_dump(mode="json"))


async def _watch(session: Session, rollout_id: str, *, as_json: bool) -> int:
    """Follow a rollout until it is final: JSON lines, a live table on a terminal, or
    plain lines (one per change) when piped. Returns the outcome's exit code."""
    plain = PlainWatch()
    live = None if as_json or not sys.stdout.isatty() else Live(auto_refresh=False)
    with live or contextlib.nullcontext():
        async with contextlib.aclosing(watch_status(session, rollout_id)) as updates:
            async for status in updates:
                if live is not None:
                    live.update(rich_table(status), refresh=True)
                else:
                    text = _as_json(status) if as_json else "\n".join(plain.lines(status))
                    if text:
                        print(text, flush=True)
                if status.phase.final:
                    return _outcome(status)
    return 1


def _rollout_list(args: argparse.Namespace) -> int:
    home = home_of(args)

    async def go() -> list[RolloutStatus]:
        async with watcher(home) as session:
            return await list_statuses(session)

    statuses = asyncio.run(go())
    if args.json:
        print(json.dumps([status.model_dump(mode="json") for status in statuses]))
    else:
        for status in statuses:
            print(status_line(status))
    return 0


def _fleet_ls(args: argparse.Namespace) -> int:
    home = home_of(args)

    async def go() -> list[DeviceRow]:
        async with watcher(home) as session:
            return await read_fleet(session)

    rows = [r for r in asyncio.run(go()) if args.hw_class in (None, r.hw_class)]
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows]))
        return 0
    now = time.time()
    header: tuple[str, ...] = ("device", "class", "release", "mode", "health", "last seen", "link")
    cells: list[tuple[str, ...]] = [
        (
            r.device_id,
            r.hw_class or "-",
            r.release or "-",
            r.mode or "-",
            r.health or "-",
            "-" if r.last_seen is None else f"{max(now - r.last_seen, 0):.0f}s ago",
            "online" if r.online else "offline",
        )
        for r in rows
    ]
    if any(r.degraded_reason for r in rows):  # why, cut to a line (--json has it whole)
        header = (*header, "why degraded")
        cells = [
            (*c, bound_text(r.degraded_reason or "", 60)) for c, r in zip(cells, rows, strict=True)
        ]
    print(text_table(header, cells))
    return 0


def _audit(args: argparse.Namespace) -> int:
    home = home_of(args)
    check_name(args.rollout_id, "rollout id")
    folder = Path(args.data) if args.data else home.root / "coordinator-data"
    entries = read_audit(folder / AUDIT_FILENAME, args.rollout_id)
    if args.json:
        print(json.dumps(entries))
    for e in [] if args.json else entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("at", 0)))
        print(f"{when}  {e.get('event', '?')}: {e.get('detail', '')}")
    if not entries:
        print(f"no audit entries for {args.rollout_id}", file=sys.stderr)
    return 0 if entries else 1


def add_rollout_views(rollout: Commands[argparse.ArgumentParser]) -> None:
    """``rollout status`` and ``rollout list``."""
    p = rollout.add_parser("status", help="print a rollout's status")
    p.add_argument("rollout_id")
    p.add_argument("--watch", action="store_true", help="follow until the rollout ends")
    p.add_argument("--timeout", type=float, default=0.0, help="with --watch: give up after")
    p.add_argument(
        "--json", action="store_true", help="one JSON document (JSON lines with --watch)"
    )
    p.set_defaults(func=_rollout_status)
    p = rollout.add_parser("list", help="every rollout's status, by id")
    p.add_argument("--json", action="store_true", help="one JSON document: a list of statuses")
    p.set_defaults(func=_rollout_list)


def add_view_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    """``fleet ls`` and ``audit``."""
    _fleet_commands(sub)
    _audit_command(sub)


def _audit_command(sub: Commands[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="every decision about a rollout, and why (oldest first)")
    p.add_argument("rollout_id")
    p.add_argument("--data", help="the coordinator's store (default: HOME/coordinator-data)")
    p.add_argument("--json", action="store_true", help="one JSON document: a list of entries")
    p.set_defaults(func=_audit)


def _fleet_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    fleet = sub.add_parser("fleet", help="the fleet as it reports").add_subparsers(required=True)
    p = fleet.add_parser(
        "ls", help="devices: class, release, mode, health, last seen, online or offline"
    )
    p.add_argument("--class", dest="hw_class", help="only this hardware class")
    p.add_argument("--json", action="store_true", help="one JSON document: a list of devices")
    p.set_defaults(func=_fleet_ls)
