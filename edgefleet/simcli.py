"""``edgefleet sim``: a fleet of simulated devices (:mod:`edgefleet.sim`) against the home's
broker and coordinator, to watch rollouts at a scale no lab has: ``fleet ls``, ``rollout
status --watch`` and ``audit`` see them like real devices. Devices missing from the home
are enrolled first (a running broker reloads its ACL and keeps every connection)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import resource
import time
from collections.abc import Sequence
from pathlib import Path

from coordinator.profiles import DEFAULT_PROFILES, load_profiles
from edgefleet.home import Home
from edgefleet.modelcli import Commands
from edgefleet.sim import SimConfig, SimStats, Simulator
from edgefleet.viewcli import home_of
from schemas import UsageError, Verdict
from schemas.topics import check_name

__all__ = ["add_sim_command", "enroll_sim_devices", "stats_line"]

_MAX_DEVICES = 100_000
"""One command's fleet: beyond it, certificates alone take minutes."""
_MAX_PROCESSES = 16


def stats_line(stats: SimStats) -> str:
    """What a simulator's devices did so far, in one line."""
    seq = max(stats.manifests, default=None)
    took = "no manifest yet" if seq is None else f"manifest {seq} taken by {stats.manifests[seq]}"
    return (
        f"connected {stats.connected}, {took}, reports healthy {stats.reports[Verdict.HEALTHY]}"
        f" unhealthy {stats.reports[Verdict.UNHEALTHY]}, refused {stats.refused},"
        f" telemetry {stats.telemetry}"
    )


def enroll_sim_devices(
    home: Home, hw_class: str, count: int, *, prefix: str = "sim", classes: Sequence[str] = ()
) -> list[Path]:
    """The bundle folders of ``prefix-00000`` .. ``prefix-{count-1}``, enrolled in
    ``hw_class`` where missing (blocking: a certificate each, the device list written
    once). Apply the new members to a running broker with :meth:`Home.apply_membership`.

    Raises:
        UsageError: one of the ids is enrolled in another class, or is revoked.
        ValueError: a bad prefix or class.
    """
    enrolled = home.devices()
    ids = [check_name(f"{prefix}-{i:05d}", "device id") for i in range(count)]
    for device_id in ids:
        known = enrolled.get(device_id)
        if known is not None and known != hw_class:
            msg = f"{device_id} is enrolled in class {known}, not {hw_class}"
            raise UsageError(msg)
    missing = [(d, hw_class) for d in ids if d not in enrolled]
    home.enroll_many(missing, classes=classes)
    return [home.root / "devices" / device_id for device_id in ids]


async def _serve(folders: list[Path], config: SimConfig, duration: float, every: float) -> None:
    sim = Simulator(folders, config)
    label = f"{folders[0].name}..{folders[-1].name}"
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(sim.run())
        started = time.monotonic()
        while duration <= 0 or time.monotonic() - started < duration:
            await asyncio.sleep(every if duration <= 0 else min(every, duration))
            print(f"[{label}] {stats_line(sim.stats)}", flush=True)
        runner.cancel()


def _serve_slice(folders: list[Path], config: SimConfig, duration: float, every: float) -> None:
    """A worker process: one slice of the fleet in its own event loop."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(folders, config, duration, every))


def _sim(args: argparse.Namespace) -> int:
    home = home_of(args)
    if not 1 <= args.devices <= _MAX_DEVICES or not 1 <= args.processes <= _MAX_PROCESSES:
        msg = f"--devices must be 1..{_MAX_DEVICES} and --processes 1..{_MAX_PROCESSES}"
        raise UsageError(msg)
    config = SimConfig(
        soak_s=args.soak,
        unhealthy_fraction=args.unhealthy,
        silent_fraction=args.silent,
        telemetry_s=args.telemetry,
        state_interval_s=args.state_interval,
    )
    classes = tuple(load_profiles(Path(args.classes)))
    print(f"enrolling up to {args.devices} devices of {args.hw_class} ...", flush=True)
    folders = enroll_sim_devices(
        home, args.hw_class, args.devices, prefix=args.prefix, classes=classes
    )
    membership = home.apply_membership()
    if not membership.reloaded:
        print(f"no broker runs from {home.broker_folder}: start it with 'broker up'", flush=True)
    # A session is a descriptor: lift the soft limit to the hard one (children inherit it).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    slices = [folders[i :: args.processes] for i in range(args.processes)]
    if args.processes == 1:
        _serve_slice(folders, config, args.duration, args.report)
        return 0
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_serve_slice, args=(part, config, args.duration, args.report))
        for part in slices
        if part
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    except KeyboardInterrupt:
        for worker in workers:
            worker.join()
        raise
    return 0 if all(worker.exitcode == 0 for worker in workers) else 1


def add_sim_command(sub: Commands[argparse.ArgumentParser]) -> None:
    """``edgefleet sim``."""
    p = sub.add_parser(
        "sim",
        help="run simulated devices (protocol only: no model is fetched or run) against "
        "the home's broker",
    )
    p.add_argument("--devices", type=int, default=100, help="how many (default 100)")
    p.add_argument("--class", dest="hw_class", required=True, help="their hardware class")
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-00000, ...")
    p.add_argument(
        "--classes", default=str(DEFAULT_PROFILES), help="class profiles the class must be in"
    )
    p.add_argument(
        "--soak", type=float, help="seconds before reporting (default: the release's own soak)"
    )
    p.add_argument("--unhealthy", type=float, default=0.0, help="share reporting unhealthy")
    p.add_argument("--silent", type=float, default=0.0, help="share never reporting")
    p.add_argument(
        "--telemetry", type=float, default=10.0, help="seconds per telemetry window (0: none)"
    )
    p.add_argument(
        "--state-interval",
        type=float,
        default=5.0,
        help="seconds between liveness states besides changes, as an agent's (0: none)",
    )
    p.add_argument("--processes", type=int, default=1, help="worker processes (2 cores: 1-2)")
    p.add_argument("--report", type=float, default=5.0, help="seconds between status lines")
    p.add_argument("--duration", type=float, default=0.0, help="stop after (0: at Ctrl-C)")
    p.set_defaults(func=_sim)
