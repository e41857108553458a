"""The ``edgefleet`` commands of the operator and the cloud side: keys, devices, accounts,
the broker, the coordinator, rollouts, views, the dashboard, models, the simulator and the
demo.

They need the ``coordinator`` extra (``pip install 'edgefleet[coordinator]'``); the device's
commands (:mod:`edgefleet.agentcli`) need only the base install, so :mod:`edgefleet.cli`
imports this module only for a command of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from broker.launcher import MosquittoBroker
from broker.session import Session
from coordinator import serve
from coordinator.config import MetricsConfig
from coordinator.operator import (
    next_generation,
    read_spec,
    submit_spec,
)
from coordinator.profiles import DEFAULT_PROFILES, load_profiles
from edgefleet.asyncapi import add_asyncapi_command
from edgefleet.compose import coordinator_config, publish_rollout
from edgefleet.dashcli import add_dashboard_command
from edgefleet.demo import run_demo
from edgefleet.home import ACCOUNT_ROLES, OPERATOR, Home
from edgefleet.modelcli import Commands, add_model_commands
from edgefleet.plancli import add_plan_command
from edgefleet.simcli import add_sim_command
from edgefleet.specargs import add_spec_arguments, rollout_id_of, spec_options
from edgefleet.tailcli import add_tail_command
from edgefleet.viewcli import add_rollout_views, add_view_commands, home_of
from schemas import Desired, Role, RolloutSpec
from schemas.topics import check_name

__all__ = ["add_commands"]


def _keys_init(args: argparse.Namespace) -> int:
    home = Home.init(Path(args.home), host=args.host)
    print(f"created {home.root}: root, manifest and operator keys, CA, accounts, trust v1")
    return 0


def _applied(home: Home, reloaded: bool) -> str:
    if reloaded:
        return "the running broker reloaded its ACL, passwords and CRL"
    return f"no broker runs from {home.broker_folder}; it applies at its next start"


def _enroll(args: argparse.Namespace) -> int:
    home = home_of(args)
    folder = home.enroll(
        args.device_id, args.hw_class, classes=tuple(load_profiles(Path(args.classes)))
    )
    membership = home.apply_membership()
    print(folder)
    print(_applied(home, membership.reloaded), file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    home = home_of(args)
    # Idempotent: revoking again retries what a broker that was down could not do.
    if not home.is_revoked(args.device_id):
        home.revoke(args.device_id)
    membership = asyncio.run(home.evict(args.device_id))
    print(f"revoked {args.device_id}: {_applied(home, membership.reloaded)}")
    if membership.evicted:
        print(f"{args.device_id}: disconnected, retained topics cleared")
    else:
        print(
            f"{args.device_id}: retained topics not cleared; run this again while the broker"
            " runs from the home"
        )
    return 0


def _account_add(args: argparse.Namespace) -> int:
    home = home_of(args)
    home.add_account(args.name, args.role)
    print(
        f"added {args.role} account {args.name}: {_applied(home, home.apply_membership().reloaded)}"
    )
    return 0


def _device_list(args: argparse.Namespace) -> int:
    for enrollment in home_of(args).enrollments():
        state = "revoked" if enrollment.revoked else "enrolled"
        print(f"{enrollment.device_id}\t{enrollment.hw_class}\t{state}")
    return 0


def _broker_up(args: argparse.Namespace) -> int:
    home = home_of(args)
    _, ports = home.broker()
    broker = MosquittoBroker(
        folder=home.broker_folder,
        material=home.broker_material(),
        ports=ports,
        host=args.bind,
    )
    # Block the signals first so sigwait() receives them and the broker is stopped by
    # the context manager rather than orphaned by the default handler.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with broker:
        print(
            f"mosquitto up: devices :{ports.devices} (mTLS), services :{ports.services}, "
            f"websockets :{ports.websockets}; Ctrl-C stops it",
            flush=True,
        )
        signal.sigwait(stop_signals)
    return 0


def _coordinator_run(args: argparse.Namespace) -> int:
    home = home_of(args)
    config = coordinator_config(
        home,
        Path(args.data) if args.data else home.root / "coordinator-data",
        Path(args.classes),
        datasets_dir=Path(args.datasets) if args.datasets else None,
    )
    if args.metrics is not None:
        config = dataclasses.replace(config, metrics=MetricsConfig.parse(args.metrics))
    asyncio.run(serve(config))
    return 0


def _operator(home: Home) -> Session:
    """The operator's account; the broker makes its client id the account name."""
    return Session(home.service_endpoint(OPERATOR), client_id=OPERATOR)


def _rollout_start(args: argparse.Namespace) -> int:
    home = home_of(args)
    rollout_id = rollout_id_of(args)
    options = spec_options(args)

    async def go() -> RolloutSpec:
        async with _operator(home) as session:
            return await publish_rollout(
                session,
                home,
                Path(args.model),
                rollout_id=rollout_id,
                name=args.name,
                profiles=load_profiles(Path(args.classes)),
                classes=tuple(args.hw_class),
                options=options,
            )

    spec = asyncio.run(go())
    print(json.dumps(spec.model_dump(mode="json")) if args.json else rollout_id)
    return 0


def _rollout_change(desired: Desired) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        home = home_of(args)
        check_name(args.rollout_id, "rollout id")

        async def go() -> int:
            async with _operator(home) as session:
                spec = await read_spec(session, args.rollout_id)
                if spec is None:
                    print(f"no rollout {args.rollout_id}", file=sys.stderr)
                    return 1
                changed = next_generation(spec, desired)
                await submit_spec(session, changed, home.key(Role.OPERATOR))
                if args.json:
                    print(json.dumps(changed.model_dump(mode="json")))
                return 0

        return asyncio.run(go())

    return run


def _demo(args: argparse.Namespace) -> int:
    return 0 if run_demo(devices_per_class=args.devices_per_class, keep=args.keep) else 1


def add_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    """Every command but ``agent``'s, on the CLI's subparsers."""
    _membership_commands(sub)
    _service_commands(sub)
    _rollout_commands(sub)
    add_view_commands(sub)
    add_tail_command(sub)
    add_asyncapi_command(sub)
    add_dashboard_command(sub)
    add_model_commands(sub)
    add_sim_command(sub)
    p = sub.add_parser("demo", help="broker, coordinator, fleet and three rollouts, live")
    p.add_argument("--devices-per-class", type=int, default=12)
    p.add_argument(
        "--keep",
        action="store_true",
        help="say how to open the dashboard, keep the fleet running until Ctrl-C and the folder",
    )
    p.set_defaults(func=_demo)


def _membership_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="signing keys and trust").add_subparsers(required=True)
    p = keys.add_parser("init", help="create root/manifest/operator keys, CA and accounts")
    p.add_argument("--host", default="127.0.0.1", help="broker host name for certificates")
    p.set_defaults(func=_keys_init)

    device = sub.add_parser("device", help="devices").add_subparsers(required=True)
    p = device.add_parser(
        "enroll", help="issue a device certificate and bundle; a running broker reloads"
    )
    p.add_argument("device_id")
    p.add_argument("--class", dest="hw_class", required=True)
    p.add_argument(
        "--classes", default=str(DEFAULT_PROFILES), help="class profiles the class must be in"
    )
    p.set_defaults(func=_enroll)
    p = device.add_parser(
        "revoke", help="revoke a device: refused by the broker, disconnected, topics cleared"
    )
    p.add_argument("device_id")
    p.set_defaults(func=_revoke)
    p = device.add_parser("list", help="every enrolled device, its class, and if revoked")
    p.set_defaults(func=_device_list)

    account = sub.add_parser("account", help="broker accounts").add_subparsers(required=True)
    p = account.add_parser(
        "add", help="add a password account (one session each: one per concurrent process)"
    )
    p.add_argument("name")
    p.add_argument(
        "--role",
        required=True,
        choices=ACCOUNT_ROLES,
        help="admin: the coordinator's rights; operator: staging and specs; dashboard: read",
    )
    p.set_defaults(func=_account_add)


def _service_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    broker = sub.add_parser("broker", help="the MQTT broker").add_subparsers(required=True)
    p = broker.add_parser("up", help="run Mosquitto for development")
    p.add_argument("--bind", default="127.0.0.1")
    p.set_defaults(func=_broker_up)

    coord = sub.add_parser("coordinator", help="the cloud side").add_subparsers(required=True)
    p = coord.add_parser("run", help="run the coordinator")
    p.add_argument("--classes", default=str(DEFAULT_PROFILES), help="hardware class profiles")
    p.add_argument("--data", help="the coordinator's store (default: HOME/coordinator-data)")
    p.add_argument(
        "--datasets", help="folder of held-out data sets (<name>.npz) for the accuracy gates"
    )
    p.add_argument(
        "--metrics",
        nargs="?",
        const="127.0.0.1:9464",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics on /metrics (default when given: 127.0.0.1:9464)",
    )
    p.set_defaults(func=_coordinator_run)


def _rollout_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    rollout = sub.add_parser("rollout", help="rollouts").add_subparsers(required=True)
    p = rollout.add_parser("start", help="publish a model and a signed rollout spec")
    add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="print the signed spec as JSON")
    p.set_defaults(func=_rollout_start)
    add_plan_command(rollout)
    add_rollout_views(rollout)
    for verb, desired in (
        ("pause", Desired.PAUSED),
        ("resume", Desired.ACTIVE),
        ("abort", Desired.ABORTED),
    ):
        p = rollout.add_parser(verb, help=f"{verb} a rollout (a new spec generation)")
        p.add_argument("rollout_id")
        p.add_argument("--json", action="store_true", help="print the new generation as JSON")
        p.set_defaults(func=_rollout_change(desired))
