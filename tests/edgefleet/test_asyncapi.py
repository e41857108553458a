"""The AsyncAPI document: committed as generated from ``schemas/`` and ``broker/acl.py``,
valid for the official parser (``@asyncapi/parser``, run by node from ``tools/asyncapi``,
which ``scripts/test.sh`` installs), and true to the ACL about who may do what."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import pytest

from edgefleet import asyncapi
from edgefleet.asyncapi import DOCUMENT, document, permissions, render
from edgefleet.cli import main
from schemas import DeviceState
from schemas.catalog import CHANNELS, Channel

TOOL = Path(__file__).resolve().parents[2] / "tools" / "asyncapi"


def _channel(key: str) -> Channel:
    return next(c for c in CHANNELS if c.key == key)


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node is not None, "node is missing: scripts/test.sh installs it (nodejs, npm)"
    assert (TOOL / "node_modules" / "@asyncapi" / "parser").is_dir(), (
        "the parser is not installed: scripts/test.sh runs `npm ci` in tools/asyncapi"
    )
    return subprocess.run(
        [node, str(TOOL / "validate.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_committed_document_is_what_the_schemas_generate() -> None:
    assert DOCUMENT.read_text(encoding="utf-8") == render(), (
        "docs/asyncapi.json is stale: run `edgefleet asyncapi` and commit it"
    )


def test_a_changed_message_changes_the_document(monkeypatch: pytest.MonkeyPatch) -> None:
    class DeviceStateV2(DeviceState):
        firmware: str = "1.0"

    channels = tuple(
        dataclasses.replace(c, model=DeviceStateV2) if c.key == "deviceState" else c
        for c in CHANNELS
    )
    monkeypatch.setattr(asyncapi, "CHANNELS", channels)
    assert render() != DOCUMENT.read_text(encoding="utf-8")
    assert "firmware" in document()["components"]["schemas"]["DeviceStateV2"]["properties"]


def test_the_official_parser_validates_the_document() -> None:
    checked = _validate(DOCUMENT)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"valid AsyncAPI 3.0.0: {len(CHANNELS)} channels" in checked.stdout


def test_the_official_parser_refuses_a_broken_document(tmp_path: Path) -> None:
    broken: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    broken["operations"]["publishDeviceState"]["action"] = "shout"
    del broken["channels"]["deviceHealth"]  # its operations now point nowhere
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken), encoding="utf-8")
    checked = _validate(path)
    assert checked.returncode == 1, checked.stdout
    assert "error" in checked.stdout


def test_who_may_publish_and_subscribe_follows_the_acl() -> None:
    state = _channel("deviceState")
    assert permissions(state, "write") == {"coordinator": "all", "admin": "all", "device": "own"}
    assert permissions(state, "read")["dashboard"] == "all"
    manifest = _channel("classManifest")
    assert permissions(manifest, "read")["device"] == "own"  # its class's only
    assert "device" not in permissions(manifest, "write")
    for key in ("rolloutSpec", "stagingMeta", "stagingChunk"):
        assert "device" not in permissions(_channel(key), "read"), key
        assert permissions(_channel(key), "write")["operator"] == "all", key
    assert "operator" not in permissions(_channel("artifactChunk"), "write")
    for channel in CHANNELS:  # read-only accounts publish nothing; the coordinator anything
        assert "dashboard" not in permissions(channel, "write"), channel.key
        assert permissions(channel, "write")["coordinator"] == "all", channel.key


def test_each_operation_names_its_accounts_and_retain_as_its_channel() -> None:
    doc = document()
    for key, operation in doc["operations"].items():
        channel = _channel(operation["channel"]["$ref"].rsplit("/", 1)[1])
        mode: Literal["read", "write"] = "write" if operation["action"] == "send" else "read"
        listed = {a["account"]: a["scope"] for a in operation["x-edgefleet-accounts"]}
        assert listed == permissions(channel, mode), key
        assert operation["bindings"]["mqtt"]["retain"] is channel.retained, key
        (message,) = operation["messages"]
        assert message["$ref"].startswith(f"#/channels/{channel.key}/messages/")
    assert doc["channels"]["deviceState"]["address"] == "fleet/v1/devices/{deviceId}/state"


def test_the_command_writes_the_document_and_checks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "asyncapi.json"
    assert main(["asyncapi", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
    assert main(["asyncapi", "--out", str(out), "--check"]) == 0
    out.write_text("{}", encoding="utf-8")
    assert main(["asyncapi", "--out", str(out), "--check"]) == 1
    assert "edgefleet asyncapi" in capsys.readouterr().err
