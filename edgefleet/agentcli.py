"""``edgefleet agent ...``: the device's commands, on the base install alone.

Importing this module loads nothing but the standard library: a command imports what it
runs when it runs, so ``edgefleet agent run`` loads the agent (onnxruntime, paho,
pydantic, numpy) and never the model toolchain (onnx, scikit-learn, scipy) nor the
coordinator. The simulated sources need the toolchain and say so when it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent import Agent, InputSource
    from agent.config import DeviceSettings
    from agent.sdnotify import Notifier

__all__ = ["SIMULATED_SOURCES", "add_agent_commands"]

SIMULATED_SOURCES = ("cytology", "digits")
"""The simulated inputs (``edgefleet.sources.SOURCES``), named here so that the parser
is built without importing them."""

_DEFAULT_SOURCE = "digits"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def add_agent_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = sub.add_parser("agent", help="the device side").add_subparsers(required=True)
    p = agent.add_parser(
        "run",
        help="run an agent on its enrollment bundle",
        description="Run the device's agent. Settings come from --config FILE (TOML), "
        "then EDGEFLEET_<KEY> environment variables (EDGEFLEET_BUNDLE, EDGEFLEET_DATA, "
        "EDGEFLEET_LOG_FORMAT, EDGEFLEET_INFERENCE_HZ, ...), then these flags. Under "
        "systemd (NOTIFY_SOCKET) it reports READY=1 and watchdog pings.",
    )
    p.add_argument("--config", type=Path, help="a TOML file of settings (see deploy/agent.toml)")
    p.add_argument("--bundle", type=Path, help="the enrollment bundle's folder")
    p.add_argument("--data", type=Path, help="data folder (default: BUNDLE/data)")
    p.add_argument(
        "--source",
        choices=(*SIMULATED_SOURCES, "none"),
        help="the paced input: none (the endpoint or the inbox only; the default with "
        "--serve or --folder), or simulated (needs edgefleet[models]): digits, a camera "
        "showing held-out real digit images (the default otherwise); cytology, an analyser "
        "reading held-out fine-needle aspirate measurements",
    )
    p.add_argument(
        "--serve",
        metavar="[HOST:]PORT|unix:/PATH",
        help="serve the model on a local Open Inference Protocol (KServe v2 REST) endpoint: "
        "TCP on HOST (default 127.0.0.1) or a Unix socket",
    )
    p.add_argument(
        "--folder",
        type=Path,
        metavar="DIR",
        help="an inbox: each .npy/.npz/image file dropped into DIR is inferred once, the "
        "answer written to DIR/results/NAME.json and the file moved to DIR/done/ (images "
        "need edgefleet[images])",
    )
    p.add_argument(
        "--replay",
        type=Path,
        metavar="FILE.npz",
        help="replay inputs from FILE in a loop instead (one member per model input, named "
        "after it, (N, ...) each); needs only the base install",
    )
    p.set_defaults(func=_agent_run)


def _agent_run(args: argparse.Namespace) -> int:
    from agent.config import load_settings  # noqa: PLC0415 (what agent commands run, only)

    flags = {
        "bundle": args.bundle,
        "data": args.data,
        "source": args.source,
        "replay": args.replay,
        "serve": args.serve,
        "folder": args.folder,
        "log_format": args.log_format,
    }
    settings = load_settings(args.config, os.environ, flags)
    _configure_logging(settings, verbose=args.verbose)
    agent = _make_agent(settings)
    asyncio.run(_serve(agent, _notifier(), settings))
    return 0


def _configure_logging(settings: DeviceSettings, *, verbose: bool) -> None:
    from edgefleet.logs import configure_logging  # noqa: PLC0415

    level = logging.INFO if verbose else _LEVELS[settings.log_level]
    configure_logging(level, settings.log_format.value)


def _make_agent(settings: DeviceSettings) -> Agent:
    from agent import Agent, Bundle  # noqa: PLC0415

    config = settings.agent_config()  # checks a bundle was given
    assert settings.bundle is not None
    bundle = Bundle.load(settings.bundle)
    return Agent(bundle, settings.bundle, config, _input_source(settings))


def _input_source(settings: DeviceSettings) -> InputSource | None:
    """The agent's paced input: a replayed file, a simulated source, or none (``none``,
    or by default when an endpoint or an inbox is its input).

    Raises:
        UsageError: an unknown source, or a simulated one without the model toolchain.
    """
    from edgefleet.sources import SOURCES, Source, replay_source  # noqa: PLC0415
    from schemas import UsageError  # noqa: PLC0415

    name, replay = settings.source, settings.replay
    if replay is not None:
        return Source(replay_source(replay))
    if name == "none" or (name is None and (settings.serve or settings.folder)):
        return None
    name = name or _DEFAULT_SOURCE
    if name not in SOURCES:
        msg = f"unknown source {name!r}: one of {', '.join(sorted(SOURCES))}, or --replay FILE"
        raise UsageError(msg)
    try:
        return Source(SOURCES[name](0))
    except ModuleNotFoundError as exc:
        msg = (
            f"the simulated {name} source needs the model toolchain ({exc.name} is missing):"
            " install edgefleet[models], or replay your own inputs with --replay FILE.npz"
        )
        raise UsageError(msg) from None


def _notifier() -> Notifier | None:
    from agent.sdnotify import Notifier  # noqa: PLC0415

    return Notifier.from_env(os.environ)


async def _serve(agent: Agent, notifier: Notifier | None, settings: DeviceSettings) -> None:
    """Run the agent until a signal stops it, with its inbox when it has one, telling
    systemd (when it asked) that it is ready once restored, and that it lives at half
    the watchdog interval."""
    from agent.folder import FolderInbox  # noqa: PLC0415
    from agent.sdnotify import keep_systemd_posted  # noqa: PLC0415

    inbox_config = settings.inbox_config()
    async with asyncio.TaskGroup() as tg:
        helpers: list[asyncio.Task[None]] = []
        if notifier is not None:
            status = f"device {agent.device_id}"
            helpers.append(
                tg.create_task(keep_systemd_posted(notifier, agent.ready.wait, status=status))
            )
        if inbox_config is not None:
            inbox = FolderInbox(
                inbox_config,
                infer=agent.infer,
                release=lambda: agent.active_release,
                until_serving=agent.until_serving,
            )
            helpers.append(tg.create_task(inbox.run()))
        try:
            await agent.run_until_signalled()
        finally:
            for task in helpers:
                task.cancel()
