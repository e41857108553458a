"""The ``edgefleet`` command line as an operator uses it: keys, enrollment, and rollout
start / status / pause / abort against a live coordinator and agents on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent import Bundle
from agent.link import STATE_SETTLE_S
from edgefleet.cli import main
from edgefleet.fleet import Fleet
from edgefleet.home import Home
from edgefleet.viewcli import EXIT_FAILED
from models import DemoModel
from schemas import Cause, Phase, Role, RolloutStatus, TrustedState
from tests.integration.fleetkit import INTEL, JETSON, MakeFleet, live


def test_keys_init_writes_private_keys_0600_and_a_root_signed_trust(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home_dir = tmp_path / "home"
    assert main(["--home", str(home_dir), "keys", "init"]) == 0
    for private in (
        "keys/root.key",
        "keys/manifest.key",
        "keys/operator.key",
        "ca/ca.key",
        "ca/server.key",
        "accounts.json",
    ):
        assert stat.S_IMODE((home_dir / private).stat().st_mode) == 0o600, private
    home = Home(home_dir)
    trusted = TrustedState(home.root_public_keys())
    issued = (home_dir / "keys" / "trust.signed").stat().st_mtime
    doc = trusted.update_trust(home.trust(), now=issued)
    assert doc.keys_for(Role.MANIFEST).keys() == {home.key(Role.MANIFEST).id}

    assert main(["--home", str(home_dir), "keys", "init"]) == 2
    assert "already holds an edgefleet home" in capsys.readouterr().err


def test_enroll_issues_a_certificate_whose_cn_is_the_device_id(tmp_path: Path) -> None:
    home_dir = str(tmp_path / "home")
    assert main(["--home", home_dir, "keys", "init"]) == 0
    assert main(["--home", home_dir, "device", "enroll", "cam-7", "--class", JETSON]) == 0
    folder = tmp_path / "home" / "devices" / "cam-7"
    bundle = Bundle.load(folder)
    assert (bundle.device_id, bundle.hw_class) == ("cam-7", JETSON)
    cert = x509.load_pem_x509_certificate((folder / "device.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"
    assert stat.S_IMODE((folder / "device.key").stat().st_mode) == 0o600
    assert set(bundle.root_public_keys()) == {Home(tmp_path / "home").key(Role.ROOT).id}

    assert main(["--home", home_dir, "device", "enroll", "cam-7", "--class", JETSON]) == 2
    assert main(["--home", home_dir, "device", "enroll", "a/b", "--class", JETSON]) == 2


@contextlib.contextmanager
def _running(fleet: Fleet) -> Iterator[None]:
    """The coordinator and agents on an event loop of their own, so the CLI can run
    ``asyncio.run`` in the test's thread as it does from a shell."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        async with live(fleet):
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert started.wait(30)
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def _cli(fleet: Fleet, *args: str) -> int:
    return main(["--home", str(fleet.home.root), *args])


def _listed_once_settled(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> list[Any]:
    """``fleet ls --json`` once no device's state says ``updating`` or ``idle``: a state
    settles ``STATE_SETTLE_S`` to twice that before it is published, so it may follow the
    status that ended a rollout by that much. Read again every quarter second, a bounded
    number of times."""
    for _ in range(int((STATE_SETTLE_S + 10.0) / 0.25)):
        assert _cli(fleet, "fleet", "ls", "--json") == 0
        devices: list[Any] = json.loads(capsys.readouterr().out)
        if all(d["mode"] not in ("updating", "idle") for d in devices):
            break
        time.sleep(0.25)
    return devices


def test_rollout_commands_drive_a_live_fleet(
    make_fleet: MakeFleet,
    demo_models: dict[str, DemoModel],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet = make_fleet({JETSON: 2, INTEL: 1})
    v1, v2 = demo_models["digits-v1"].path, demo_models["digits-v2"].path
    with _running(fleet):
        start = ["rollout", "start", "--class", JETSON, "--class", INTEL]
        assert _cli(fleet, *start, "--model", str(v1), "--waves", "100", "--id", "first") == 0
        assert _cli(fleet, "rollout", "status", "first", "--watch", "--timeout", "60") == 0
        out = capsys.readouterr().out
        assert "first gen 1 completed wave 1/1 release digits-v1:fp32@" in out
        # "updated" reads the devices' states, which settle a second or two after their
        # health reports: the status that ends the rollout may not count them all yet.
        assert re.search(r"targeted 3 updated [0-3] healthy 3 unhealthy 0", out), out

        devices = _listed_once_settled(fleet, capsys)
        assert sorted(d["device_id"] for d in devices) == sorted(fleet.home.devices())
        for device in devices:  # each serves the completed rollout's release, healthy on it
            assert device["release"].startswith("digits-v1:fp32@"), device
            assert (device["mode"], device["health"], device["online"]) == (
                "serving",
                "healthy",
                True,
            ), device
        assert _cli(fleet, "fleet", "ls", "--class", INTEL) == 0
        header, *rows = capsys.readouterr().out.splitlines()
        assert header.split()[:5] == ["device", "class", "release", "mode", "health"]
        assert [row.split()[1] for row in rows] == [INTEL]
        assert rows[0].endswith("online")

        assert _cli(fleet, *start, "--model", str(v2), "--waves", "50,100", "--id", "second") == 0
        assert _cli(fleet, "rollout", "pause", "second") == 0
        assert _cli(fleet, "rollout", "abort", "second") == 0
        watched = ("rollout", "status", "second", "--watch", "--timeout", "60")
        assert _cli(fleet, *watched) == EXIT_FAILED  # the outcome, in the exit code
        out = capsys.readouterr().out
        assert "second gen 3 rolled_back" in out
        assert "aborted by operator" in out

        assert _cli(fleet, "rollout", "status", "second", "--json") == EXIT_FAILED
        (line,) = capsys.readouterr().out.splitlines()
        status = RolloutStatus.model_validate_json(line)
        assert (status.id, status.phase, status.cause) == (
            "second",
            Phase.ROLLED_BACK,
            Cause.OPERATOR_ABORT,
        )

        store = str(fleet.workdir / "coordinator")
        assert _cli(fleet, "audit", "second", "--data", store, "--json") == 0
        decisions = json.loads(capsys.readouterr().out)
        assert {d["rollout"] for d in decisions} == {"second"}
        assert any("aborted by operator" in d["detail"] for d in decisions), decisions
        assert _cli(fleet, "audit", "second", "--data", store) == 0
        assert len(capsys.readouterr().out.splitlines()) == len(decisions)
        assert _cli(fleet, "audit", "nothing-here", "--data", store) == 1
        assert "no audit entries for nothing-here" in capsys.readouterr().err

        assert _cli(fleet, "rollout", "list") == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == ["first", "second"]
        assert _cli(fleet, "rollout", "list", "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(s["id"], s["phase"]) for s in listed] == [
            ("first", "completed"),
            ("second", "rolled_back"),
        ]

        assert _cli(fleet, "rollout", "status", "nothing-here") == 1
        assert "no status for nothing-here" in capsys.readouterr().err


def _one_clear_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert len(lines[0]) <= 320
    return lines[0]


def test_input_errors_are_one_line_and_a_non_zero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home_dir = str(tmp_path / "home")
    assert main(["--home", home_dir, "keys", "init"]) == 0
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: the id is refused first")
    start = ["--home", home_dir, "rollout", "start", "--class", JETSON, "--model", str(model)]

    assert main([*start, "--id", "a+b"]) == 2
    assert "invalid rollout id 'a+b'" in _one_clear_line(capsys.readouterr().err)
    assert main([*start, "--id", "ok", "--waves", "10,abc"]) == 2
    assert "abc" in _one_clear_line(capsys.readouterr().err)
    assert main(["--home", home_dir, "rollout", "status", "a+b"]) == 2
    assert "rollout id" in _one_clear_line(capsys.readouterr().err)

    # A damaged enrollment bundle: pydantic's complaint, reduced to its first line.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text('{"device_id": "a+b"}')
    assert main(["--home", home_dir, "agent", "run", "--bundle", str(bundle)]) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert line.startswith("edgefleet: invalid device_id:"), line
    assert "more)" in line  # the other missing fields are counted, not dumped

    # A missing file and a broker that is not there.
    assert main(["--home", str(tmp_path / "nowhere"), "device", "list"]) == 2
    assert "devices.json" in _one_clear_line(capsys.readouterr().err)
    assert main(["--home", home_dir, "rollout", "status", "r1"]) == 2
    assert "cannot connect" in _one_clear_line(capsys.readouterr().err)
