"""``edgefleet dashboard``: the browser dashboard of a fleet home, served on loopback.

The page reads the broker itself, with a read-only dashboard account of the home, over
the broker's secure WebSockets listener, through the server's relay (which checks the
broker's certificate against the home's CA: ``dashboard.relay`` says why).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from coordinator.audit import AUDIT_FILENAME
from dashboard import BrokerTarget, DashboardConfig, DashboardServer
from edgefleet.home import DASHBOARD, Home
from edgefleet.modelcli import Commands
from schemas import UsageError

__all__ = ["add_dashboard_command", "dashboard_config"]


def dashboard_config(
    home: Home,
    *,
    account: str = DASHBOARD,
    host: str = "127.0.0.1",
    port: int = 8886,
    data: Path | None = None,
) -> DashboardConfig:
    """The dashboard of ``home``: its broker's WebSockets listener, ``account`` (which
    must be read-only) and the audit log in ``data`` (the coordinator's data folder).

    Raises:
        UsageError: ``account`` is not one of the home's dashboard accounts.
    """
    if account not in home.accounts().dashboards:
        msg = (
            f"{account!r} is not a read-only dashboard account of {home.root}; add one with"
            f" 'edgefleet account add NAME --role dashboard'"
        )
        raise UsageError(msg[:300])
    endpoint = home.service_endpoint(account)
    broker_host, ports = home.broker()
    folder = home.root / "coordinator-data" if data is None else data
    return DashboardConfig(
        broker=BrokerTarget(
            host=broker_host, port=ports.websockets, ca_file=home.root / "ca" / "ca.crt"
        ),
        username=account,
        password=endpoint.password or "",
        host=host,
        port=port,
        audit_path=folder / AUDIT_FILENAME,
    )


def _dashboard(args: argparse.Namespace) -> int:
    home = Home(Path(args.home))
    config = dashboard_config(
        home,
        account=args.account,
        host=args.bind,
        port=args.port,
        data=Path(args.data) if args.data else None,
    )

    async def serve() -> None:
        server = DashboardServer(config)
        task = asyncio.create_task(server.run())
        loop = asyncio.get_running_loop()
        for stop in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(stop, task.cancel)
        serving = asyncio.create_task(server.serving.wait())
        await asyncio.wait((task, serving), return_when=asyncio.FIRST_COMPLETED)
        serving.cancel()
        if server.serving.is_set():
            if server.public:
                print(_PUBLIC.format(bind=config.host), file=sys.stderr)
            print(
                f"dashboard: {server.url}  (read-only account {config.username}; broker "
                f"wss://{config.broker.host}:{config.broker.port}; audit trail from "
                f"{config.audit_path}); Ctrl-C stops it",
                flush=True,
            )
        with contextlib.suppress(asyncio.CancelledError):
            await task  # raises OSError when the address cannot be bound

    asyncio.run(serve())
    return 0


_PUBLIC = (
    "warning: {bind} is not a loopback address: whoever reaches the page reads the"
    " read-only account's password over plain HTTP"
)


def add_dashboard_command(sub: Commands[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dashboard", help="serve the browser dashboard (read-only) and print its address"
    )
    p.add_argument("--bind", default="127.0.0.1", help="address to serve on (default loopback)")
    p.add_argument("--port", type=int, default=8886, help="port to serve on (0: any free one)")
    p.add_argument(
        "--account", default=DASHBOARD, help="the read-only dashboard account the page uses"
    )
    p.add_argument(
        "--data",
        help="the coordinator's data folder, for the audit trail (default HOME/coordinator-data)",
    )
    p.set_defaults(func=_dashboard)
