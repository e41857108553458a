"""``edgefleet demo``: a broker, a coordinator and a fleet of agents in two hardware
classes; a first install, a model optimised into one variant per class and rolled out
in three waves, and a bad build stopped and rolled back by its health reports. Shown
live; ends by itself and cleans up. With ``keep``, it says how to open the dashboard,
keeps the fleet running once the rollouts are done (until Ctrl-C) and keeps the folder."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from broker.session import Session
from coordinator import ClassProfile, load_profiles
from coordinator.config import MetricsConfig
from edgefleet.compose import start_rollout
from edgefleet.fleet import Fleet
from edgefleet.home import WATCHER
from edgefleet.modeltools import optimize_for_classes
from models import DemoModel, build_demo_models
from models.datafile import load_dataset
from schemas import DeviceState, LanePhase, Mode, Phase, RolloutStatus, decode, topics
from schemas.topics import DeviceChannel, TopicKind

__all__ = ["DemoOutcome", "run_demo"]

CLASSES = ("jetson-vision-standard", "intel-lowpower-detector")
"""The camera classes: they run the digits models."""
CART = "medical-cart-cpu"
"""The carts run the cytology model on their analysers' readings."""


def demo_profiles() -> dict[str, ClassProfile]:
    """The shipped profiles, but carts soak for seconds rather than five minutes."""
    profiles = load_profiles()
    cart = profiles[CART]
    health = cart.health.model_copy(update={"soak_seconds": 4.0, "min_inferences": 60})
    profiles[CART] = cart.model_copy(update={"health": health})
    return profiles


@dataclass
class DemoOutcome:
    statuses: dict[str, RolloutStatus] = field(default_factory=dict)
    states: dict[str, DeviceState] = field(default_factory=dict)

    def serving(self) -> Counter[str]:
        return Counter(s.active_release or "-" for s in self.states.values())


class _Watch:
    """Follows rollout status and device state the way a dashboard does: on the wire."""

    def __init__(self, out: TextIO, started: float) -> None:
        self.outcome = DemoOutcome()
        self._out = out
        self._started = started
        self._last: dict[tuple[str, str], str] = {}
        self._shown: dict[tuple[str, str], tuple[tuple[object, ...], float]] = {}
        """(rollout, class or "") -> what was last shown, and when."""
        self.changed = asyncio.Event()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._started:6.1f}s] {text}", file=self._out, flush=True)

    async def follow(self, session: Session) -> None:
        await session.subscribe(
            topics.all_rollout_statuses(), topics.all_devices(DeviceChannel.STATE)
        )
        async for message in session.messages():
            parsed = topics.parse(message.topic)
            if parsed.kind is TopicKind.ROLLOUT_STATUS and message.payload:
                status = decode(message.payload, RolloutStatus)
                self.outcome.statuses[status.id] = status
                self._show(status)
            elif parsed.kind is TopicKind.DEVICE and message.payload:
                state = decode(message.payload, DeviceState)
                self.outcome.states[state.device_id] = state
            self.changed.set()

    def _show(self, status: RolloutStatus) -> None:
        """One line per class whose phase or wave changed (at most one a second within
        a wave), and the rollout's outcome once it is final."""
        total = len(status.waves) or 1
        for name in status.classes:
            lane = status.lanes.get(name)
            if lane is None:
                continue
            c = lane.counts
            if lane.phase is LanePhase.WAVE and c.targeted == 0 and c.pending == 0:
                continue  # a wave just opened: nothing observed yet
            wave = f"wave {min(lane.wave + 1, total)}/{total}"
            if lane.phase is LanePhase.WAVE and lane.wave < len(status.waves):
                wave += f" ({status.waves[lane.wave]})"
            line = (
                f"{status.id:<16} {name:<24} {lane.phase.value:<11} {wave:<17} "
                f"healthy {c.healthy:>2}/{c.targeted:<2} unhealthy {c.unhealthy}  "
                f"silent {c.silent}  pending {c.pending}"
            )
            if lane.waiting:
                line += f"  ({lane.waiting})"
            self._say_once((status.id, name), (lane.phase, lane.wave), line, final=lane.phase.final)
        if status.phase.final:
            line = f"{status.id:<16} {status.phase.value}"
            if status.reason:
                line += f": {status.reason}"
            self._say_once((status.id, ""), (status.phase, status.wave), line, final=True)

    def _say_once(
        self, who: tuple[str, str], key: tuple[object, ...], line: str, *, final: bool
    ) -> None:
        now = time.monotonic()
        shown = self._shown.get(who)
        if self._last.get(who) == line or (
            shown is not None and shown[0] == key and now - shown[1] < 1.0 and not final
        ):
            return
        self._last[who] = line
        self._shown[who] = (key, now)
        self.say(line)

    def fleet_line(self) -> str:
        per_class: dict[str, Counter[str]] = {}
        for state in self.outcome.states.values():
            per_class.setdefault(state.hw_class, Counter())[state.active_release or "-"] += 1
        return " | ".join(
            f"{c}: " + ", ".join(f"{n}x {r}" for r, n in sorted(releases.items()))
            for c, releases in sorted(per_class.items())
        )

    async def until_settled(self, gone: frozenset[str], timeout: float) -> bool:
        """Wait until no device's state says it is updating or serves a release of
        ``gone`` (one rolled back): states settle a second or two after the status that
        ended a rollout. False if some still do after ``timeout``."""

        def settled() -> bool:
            return all(
                s.mode is not Mode.UPDATING and s.active_release not in gone
                for s in self.outcome.states.values()
            )

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not settled():
                    self.changed.clear()
                    await self.changed.wait()
        return settled()

    async def until_final(self, rollout_id: str, timeout: float) -> RolloutStatus:
        async with asyncio.timeout(timeout):
            while True:
                status = self.outcome.statuses.get(rollout_id)
                if status is not None and status.phase.final:
                    return status
                self.changed.clear()
                await self.changed.wait()


async def _scenario(fleet: Fleet, demo_models: dict[str, DemoModel], watch: _Watch) -> bool:
    canaries = tuple(
        next(d for d, c in fleet.home.devices().items() if c == hw_class) for hw_class in CLASSES
    )
    profiles = fleet.class_profiles()
    v3 = demo_models["digits-v3"]
    watch.say("== optimise digits-v3 for the hardware classes (edgefleet model optimize)")
    _, report = await asyncio.to_thread(
        optimize_for_classes,
        v3.path,
        load_dataset(v3.dataset, "calibration"),
        load_dataset(v3.dataset, "holdout"),
        {c: profiles[c] for c in CLASSES},
        out_dir=fleet.workdir / "digits-v3.variants",
        datasets_dir=v3.dataset.parent,
    )
    for line in report.splitlines():
        watch.say(f"  {line}")
    plan = (
        (
            "install-v1",
            CLASSES,
            demo_models["digits-v1"].path,
            (100.0,),
            Phase.COMPLETED,
            "first install of digits-v1 on the cameras",
        ),
        (
            "install-cytology",
            (CART,),
            demo_models["cytology-v1"].path,
            (100.0,),
            Phase.COMPLETED,
            "first install of cytology-v1 on the medical carts (gate: held-out accuracy >= 95%)",
        ),
        (
            "upgrade-v3",
            CLASSES,
            fleet.workdir / "digits-v3.variants",
            (10.0, 50.0, 100.0),
            Phase.COMPLETED,
            "roll out digits-v3, one variant per class, in three waves (canaries, 10%, 50%, 100%)",
        ),
        (
            "bad-build",
            CLASSES,
            demo_models["digits-v2-slow"].path,
            (10.0, 50.0, 100.0),
            Phase.ROLLED_BACK,
            "roll out digits-v2-slow, a build far over the latency budget",
        ),
    )
    ok = True
    async with fleet.operator() as operator:
        for rollout_id, classes, model, waves, expected, what in plan:
            watch.say(f"== {what}")
            await start_rollout(
                operator,
                fleet.home,
                model,
                rollout_id=rollout_id,
                profiles=profiles,
                classes=classes,
                waves=waves,
                canaries=canaries if len(waves) > 1 else (),
            )
            status = await watch.until_final(rollout_id, timeout=90.0)
            rolled_back = status.phase is not Phase.COMPLETED
            if status.releases:
                heading = "candidates rolled back" if rolled_back else "releases"
                watch.say(
                    f"{heading}: "
                    + ", ".join(f"{c}: {r}" for c, r in sorted(status.releases.items()))
                )
            gone = frozenset(status.releases.values()) if rolled_back else frozenset()
            if not await watch.until_settled(gone, timeout=30.0):
                watch.say("!! devices did not settle on the outcome")
                ok = False
            watch.say(f"fleet: {watch.fleet_line()}")
            if status.phase is not expected:
                watch.say(f"!! expected {expected.value}, got {status.phase.value}")
                ok = False
    return ok


def _dashboard_hint(fleet: Fleet) -> str:
    return (
        f"dashboard: in another terminal run `edgefleet --home {fleet.home.root} dashboard "
        f"--data {fleet.workdir / 'coordinator'}` and open the address it prints"
    )


def _kept_hint(fleet: Fleet, metrics: tuple[str, int] | None) -> str:
    home = fleet.home.root
    hint = f"telemetry as JSON lines: `edgefleet --home {home} tail 'devices/+/telemetry'`"
    if metrics is not None:
        hint += f"; metrics: `curl -s http://{metrics[0]}:{metrics[1]}/metrics`"
    return hint


async def _keep_running(watch: _Watch) -> None:
    """With ``--keep``: the fleet goes on (for the dashboard) until Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    watch.say("the fleet keeps running for the dashboard; Ctrl-C ends the demo")
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _run(workdir: Path, devices_per_class: int, out: TextIO, *, keep: bool) -> bool:
    started = time.monotonic()
    watch = _Watch(out, started)
    watch.say("building demo models from scikit-learn's bundled data sets ...")
    demo_models = await asyncio.to_thread(build_demo_models, workdir / "models")
    for m in demo_models.values():
        watch.say(
            f"  {m.name:<15} {m.size / 1024:7.1f} KiB  held-out accuracy {m.holdout_accuracy:.3f}"
        )
    fleet = Fleet(
        workdir=workdir,
        classes={**dict.fromkeys(CLASSES, devices_per_class), CART: max(1, devices_per_class // 3)},
        profiles=demo_profiles(),
        sources={CART: "cytology"},
        datasets_dir=workdir / "models",
    )
    await asyncio.to_thread(fleet.setup)
    try:
        watch.say(
            f"broker up (mTLS :{fleet.broker.ports.devices}, "
            f"services :{fleet.broker.ports.services}, "
            f"websockets :{fleet.broker.ports.websockets}); starting coordinator and "
            f"{len(fleet.home.devices())} agents"
        )
        if keep:
            watch.say(_dashboard_hint(fleet))
        async with asyncio.TaskGroup() as tg:
            # Kept, it serves Prometheus metrics (on a free port, said below).
            coordinator = fleet.start_coordinator(
                tg, **({"metrics": MetricsConfig(port=0)} if keep else {})
            )
            for device_id in fleet.home.devices():
                fleet.start_agent(tg, device_id)
            # Read-only and an account of its own: one account holds one session, and the
            # scenario publishes as the operator meanwhile.
            watcher = Session(fleet.home.service_endpoint(WATCHER), client_id=WATCHER)
            async with watcher:
                follower = tg.create_task(watch.follow(watcher))
                try:
                    ok = await _scenario(fleet, demo_models, watch)
                finally:
                    follower.cancel()
            if keep:  # the watcher account is free again: for `tail` and `rollout status`
                watch.say(_kept_hint(fleet, coordinator.metrics_address))
                await _keep_running(watch)
            for task in [*fleet.agent_tasks.values(), fleet.coordinator_task]:
                if task is not None:
                    task.cancel()
    finally:
        await asyncio.to_thread(fleet.close)
    serving = watch.outcome.serving()
    watch.say(f"done: devices serving {dict(serving)}")
    total = sum(serving.values())
    inferences = sum(s.inferences_total for s in watch.outcome.states.values())
    watch.say(
        f"{'OK' if ok else 'FAILED'}: {total} devices, {inferences} inferences reported; "
        "the bad build was stopped in its first wave and rolled back"
        if ok
        else "FAILED"
    )
    return ok


def run_demo(*, devices_per_class: int = 12, keep: bool = False, out: TextIO = sys.stdout) -> bool:
    """Run the whole demo; True when every rollout ended as expected."""
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    # Mosquitto drops to its own user when started as root: it must reach its folder.
    workdir.chmod(0o755)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_run(workdir, devices_per_class, out, keep=keep))
        return False
    finally:
        if keep:
            print(f"kept {workdir}", file=out)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
