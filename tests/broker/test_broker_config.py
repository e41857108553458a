"""Pure tests: config rendering, ACL rendering and validation, password hashes."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.acl import Accounts, DeviceGrant, hash_password, render_acl, render_password_file
from broker.config import TEMPLATE_ROOT, BrokerPorts, ConfigError, default_template, render_config

PORTS = BrokerPorts(devices=18883, services=18884, websockets=18885)


def test_render_config_replaces_root_ports_and_user() -> None:
    text = render_config(
        default_template(), folder=Path("/srv/b"), ports=PORTS, run_as="edge", bind_address="::1"
    )
    assert TEMPLATE_ROOT not in text
    assert "persistence_location /srv/b/data/" in text
    listeners = [line for line in text.splitlines() if line.startswith("listener ")]
    assert listeners == ["listener 18883 ::1", "listener 18884 ::1", "listener 18885 ::1"]
    assert [line for line in text.splitlines() if line.startswith("user ")] == ["user edge"]


def test_render_config_adds_user_before_listeners_when_missing() -> None:
    template = "\n".join(f"listener {p}" for p in (1, 2, 3))
    text = render_config(template, folder=Path("/x"), ports=PORTS, run_as="root")
    assert text.splitlines()[0] == "user root"


def test_render_config_rejects_template_without_three_listeners() -> None:
    with pytest.raises(ConfigError, match="expected 3 listener"):
        render_config("listener 1883\n", folder=Path("/x"), ports=PORTS)


def test_render_config_rejects_folder_with_spaces() -> None:
    with pytest.raises(ConfigError):
        render_config(default_template(), folder=Path("/a b"), ports=PORTS)


def test_production_config_keeps_listener_order_and_safety_settings() -> None:
    text = default_template()
    assert text.index("\nrequire_certificate true") < text.index("\npassword_file ")
    assert text.count("allow_anonymous false") == 3
    assert "protocol websockets" in text
    assert "per_listener_settings true" in text


def test_acl_gives_each_device_only_its_own_rights() -> None:
    acl = render_acl([DeviceGrant("cam-1", "cls-a"), DeviceGrant("gw-1", "cls-b")], Accounts())
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in acl.split("\n\n") if "user" in b}
    assert blocks["user cam-1"] == [
        "topic read fleet/v1/trust",
        "topic read fleet/v1/classes/cls-a/manifest",
        "topic read fleet/v1/artifacts/#",
        "topic readwrite fleet/v1/devices/cam-1/presence",
        "topic readwrite fleet/v1/devices/cam-1/state",
        "topic readwrite fleet/v1/devices/cam-1/health",
        "topic readwrite fleet/v1/devices/cam-1/telemetry",
        "topic readwrite fleet/v1/devices/cam-1/events",
        "topic read fleet/v1/devices/cam-1/ack",
    ]
    assert all("write" not in line for line in blocks["user dashboard"])
    assert "topic read fleet/v1/devices/+/ack" in blocks["user dashboard"]
    assert "topic read fleet/v1/classes/+/telemetry" in blocks["user dashboard"]
    assert "pattern" not in acl
    assert "#" not in "".join(line for line in acl.splitlines() if "devices/" in line)


def test_acl_operator_writes_staging_and_specs_but_not_artifacts() -> None:
    acl = render_acl([], Accounts(admins=("standby",), revoking=("cam-9",)))
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in acl.split("\n\n") if "user" in b}
    assert blocks["user operator"] == [
        "topic read fleet/v1/#",
        "topic write fleet/v1/staging/#",
        "topic write fleet/v1/rollouts/+/spec",
    ]
    assert blocks["user standby"] == ["topic readwrite fleet/v1/#"]
    # A revoking account may only clear the device's channels.
    assert all(
        line.startswith("topic write fleet/v1/devices/cam-9/") for line in blocks["user cam-9"]
    )
    assert len(blocks["user cam-9"]) == 5


def test_production_config_binds_client_ids_and_loads_a_crl() -> None:
    text = default_template()
    lines = text.splitlines()
    assert lines.count("use_username_as_clientid true") == 3
    assert lines.count("max_qos 1") == 3
    devices = text[text.index("listener 8883") : text.index("listener 8884")]
    assert "crlfile /var/lib/edgefleet/broker/crl.pem" in devices
    assert "use_identity_as_username true" in devices


@pytest.mark.parametrize(
    ("devices", "accounts"),
    [
        ([DeviceGrant("bad id", "c")], Accounts()),
        ([DeviceGrant("../x", "c")], Accounts()),
        ([DeviceGrant("d", "c/#")], Accounts()),
        ([DeviceGrant("", "c")], Accounts()),
        ([DeviceGrant("x" * 65, "c")], Accounts()),
        ([DeviceGrant("coordinator", "c")], Accounts()),  # would inherit readwrite fleet/v1/#
        ([DeviceGrant("d", "c"), DeviceGrant("d", "c2")], Accounts()),
        ([], Accounts(operators=("coordinator",))),
        ([], Accounts(dashboards=("dash board",))),
        ([], Accounts(admins=("operator",))),
        ([DeviceGrant("cam-9", "c")], Accounts(revoking=("cam-9",))),
    ],
)
def test_acl_rejects_malformed_or_colliding_names(
    devices: list[DeviceGrant], accounts: Accounts
) -> None:
    with pytest.raises(ValueError, match=r"invalid|collides|twice|distinct"):
        render_acl(devices, accounts)


def test_password_file_format() -> None:
    text = render_password_file({"coordinator": "pw"})
    user, _, hashed = text.strip().partition(":")
    _, kind, iterations, salt, digest = hashed.split("$")
    assert (user, kind, iterations) == ("coordinator", "7", "101")
    assert len(base64.b64decode(salt)) == 12
    assert len(base64.b64decode(digest)) == 64


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd missing")
def test_password_hash_equals_mosquitto_passwd(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "u", "s3cret"], check=True)
    theirs = pwfile.read_text().strip().partition(":")[2]
    salt = base64.b64decode(theirs.split("$")[3])
    assert hash_password("s3cret", salt=salt) == theirs


def test_password_file_rejects_colon_in_username() -> None:
    with pytest.raises(ValueError, match="invalid username"):
        render_password_file({"a:b": "pw"})
