"""The wire contract as an AsyncAPI 3.0 document, generated: ``edgefleet asyncapi``.

Nothing in the document is written by hand that the code already says:

* channels, their addresses and parameters: ``schemas.catalog`` over ``schemas.topics``;
* messages and their JSON Schemas: the pydantic models (``model_json_schema``), in
  validation mode (what a party accepts), their definitions under
  ``components/schemas``; msgpack is the content type, a signed document is an
  ``Envelope`` whose body is the named model;
* who may publish and who may subscribe: the ACL ``broker.acl.render_acl`` writes for a
  sample device and one account of each role, read back and matched against each
  channel's topics, for the device's own ids and for another's.

The document is committed (``docs/asyncapi.json``); ``tests/edgefleet/test_asyncapi.py``
fails when it differs from what this module generates, and validates it with the official
parser (``tools/asyncapi``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal

from broker.acl import Accounts, DeviceGrant, render_acl
from edgefleet.home import DEFAULT_PORTS
from edgefleet.modelcli import Commands
from schemas import SCHEMA_VERSION, WireModel
from schemas.catalog import CHANNELS, DEVICE_ID, HW_CLASS, Body, Channel
from schemas.envelope import Envelope
from schemas.topics import PREFIX

__all__ = ["DOCUMENT", "ROLES", "add_asyncapi_command", "document", "permissions", "render"]

DOCUMENT: Final = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"
"""Where the generated document is committed."""
Role = Literal["device", "coordinator", "admin", "operator", "dashboard"]
ROLES: Final[dict[Role, str]] = {
    "device": "A device's certificate (its CN is the device id), on the mTLS listener.",
    "coordinator": "The coordinator's password account: the whole tree.",
    "admin": "Accounts with the coordinator's rights and a session of their own.",
    "operator": "Operators (the CLI): read everything, upload to staging, sign specs.",
    "dashboard": "Read-only accounts (dashboards over WebSockets, `watcher`, tail).",
}
_ACCOUNTS: Final = Accounts(
    coordinator="coordinator", admins=("admin",), operators=("operator",), dashboards=("dashboard",)
)
_REF: Final = "#/components/schemas/{model}"
_MQTT: Final = "0.2.0"
"""The version of AsyncAPI's MQTT bindings used."""
Scope = Literal["all", "own"]


@functools.cache
def _rules() -> dict[Role, list[tuple[str, str]]]:
    """The ACL ``broker.acl`` renders for one sample device and one account of each role,
    read back as role -> (mode, filter) rules."""
    device = DeviceGrant(DEVICE_ID.sample, HW_CLASS.sample)
    roles: dict[str, Role] = {
        device.device_id: "device",
        _ACCOUNTS.coordinator: "coordinator",
        **dict.fromkeys(_ACCOUNTS.admins, "admin"),
        **dict.fromkeys(_ACCOUNTS.operators, "operator"),
        **dict.fromkeys(_ACCOUNTS.dashboards, "dashboard"),
    }
    rules: dict[Role, list[tuple[str, str]]] = {}
    role: Role | None = None
    for line in render_acl([device], _ACCOUNTS).splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            role = roles[words[1]]
            rules.setdefault(role, [])
        elif words[:1] == ["topic"] and role is not None:
            rules[role].append((words[1], words[2]))
    return rules


def _matches(topic_filter: str, topic: str) -> bool:
    """Whether an MQTT topic filter matches a topic (``+`` one level, ``#`` the rest)."""
    levels = topic.split("/")
    for i, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(topic_filter.split("/")) == len(levels)


def _may(rules: list[tuple[str, str]], mode: str, topic: str) -> bool:
    return any(m in (mode, "readwrite") and _matches(f, topic) for m, f in rules)


def permissions(channel: Channel, mode: Literal["read", "write"]) -> dict[Role, Scope]:
    """Which roles may ``mode`` (read: subscribe, write: publish) the channel: on every
    such topic (``all``) or only on those naming their own device or class (``own``)."""
    own = channel.address()
    other = channel.address(tuple(p.other for p in channel.params))
    found: dict[Role, Scope] = {}
    for role, rules in _rules().items():
        if _may(rules, mode, other):
            found[role] = "all"
        elif _may(rules, mode, own):
            found[role] = "own"
    return found


def _schemas() -> dict[str, Any]:
    """Every model's JSON Schema, and the definitions they share, by name.

    Raises:
        ValueError: two different definitions under one name.
    """
    found: dict[str, Any] = {}
    models: list[type[WireModel]] = [Envelope, *(c.model for c in CHANNELS if c.model)]
    for model in models:
        schema = model.model_json_schema(ref_template=_REF, mode="validation")
        for name, part in [*schema.pop("$defs", {}).items(), (model.__name__, schema)]:
            if found.setdefault(name, part) != part:
                msg = f"two JSON Schemas named {name}"
                raise ValueError(msg)
    return found


def _ref(model: type[WireModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _message(channel: Channel) -> dict[str, Any]:
    """The channel's message, without its texts."""
    match channel.body:
        case Body.PRESENCE:
            payload: dict[str, Any] = {"type": "string", "enum": ["online", "offline"]}
            return {"contentType": "text/plain", "payload": payload}
        case Body.BYTES:
            payload = {"type": "string", "format": "binary"}
            return {"contentType": "application/octet-stream", "payload": payload}
        case Body.SIGNED:
            assert channel.model is not None
            body = {"kind": channel.signed_kind, "schema": _ref(channel.model)}
            return {"payload": _ref(Envelope), "x-edgefleet-signed-body": body}
        case Body.MSGPACK:
            assert channel.model is not None
            return {"payload": _ref(channel.model)}


def _described(channel: Channel, name: str) -> dict[str, Any]:
    """The channel's message, named and described."""
    notes = [channel.summary]
    if channel.body is Body.SIGNED:
        notes.append(
            f"An `Envelope` signed as kind `{channel.signed_kind}` (Ed25519 over "
            f"`edgefleet/v1/{channel.signed_kind}\\0` + body); its `body` is a msgpack "
            f"`{channel.model.__name__ if channel.model else ''}`, decoded only once a key "
            "the TrustDoc allows signed it."
        )
    if channel.stamp is not None:
        notes.append(f"Its own time is `{channel.stamp}` (seconds since the epoch).")
    if channel.retained:
        notes.append("Retained: an empty payload clears it.")
    title = name if channel.model is None else channel.model.__name__
    head = {"name": name, "title": title, "summary": channel.summary}
    return head | _message(channel) | {"description": " ".join(notes)}


def _scope_text(role: Role, scope: Scope, channel: Channel) -> str:
    if scope == "all":
        return role
    return f"{role} ({'of its class' if HW_CLASS in channel.params else 'its own'})"


_ACTIONS: Final[tuple[tuple[str, Literal["read", "write"], str], ...]] = (
    ("send", "write", "publish"),
    ("receive", "read", "subscribe"),
)


def _operations(channel: Channel, message: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for action, mode, verb in _ACTIONS:
        allowed = permissions(channel, mode)
        if not allowed:
            continue
        who = ", ".join(_scope_text(role, scope, channel) for role, scope in allowed.items())
        key = f"{verb}{channel.key[0].upper()}{channel.key[1:]}"
        yield (
            key,
            {
                "action": action,
                "channel": {"$ref": f"#/channels/{channel.key}"},
                "title": f"{verb.capitalize()} {channel.key}",
                "summary": f"May {verb}: {who}.",
                "tags": [{"$ref": f"#/components/tags/{role}"} for role in allowed],
                "messages": [{"$ref": f"#/channels/{channel.key}/messages/{message}"}],
                "bindings": {
                    "mqtt": {"qos": 1, "retain": channel.retained, "bindingVersion": _MQTT}
                },
                "x-edgefleet-accounts": [{"account": r, "scope": s} for r, s in allowed.items()],
            },
        )


def _servers() -> dict[str, Any]:
    ports = DEFAULT_PORTS
    mqtt = {"mqtt": {"bindingVersion": _MQTT}}
    return {
        "devices": {
            "host": f"localhost:{ports.devices}",
            "protocol": "secure-mqtt",
            "protocolVersion": "5",
            "description": "Devices: TLS with a client certificate (mTLS); its CN is the id.",
            "security": [{"$ref": "#/components/securitySchemes/deviceCertificate"}],
            "bindings": mqtt,
        },
        "services": {
            "host": f"localhost:{ports.services}",
            "protocol": "secure-mqtt",
            "protocolVersion": "5",
            "description": "The coordinator, operators and tools: TLS and a password account.",
            "security": [{"$ref": "#/components/securitySchemes/account"}],
            "bindings": mqtt,
        },
        "websockets": {
            "host": f"localhost:{ports.websockets}",
            "protocol": "wss",
            "protocolVersion": "5",
            "description": "Dashboards in a browser: MQTT over secure WebSockets, a password.",
            "security": [{"$ref": "#/components/securitySchemes/account"}],
        },
    }


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the topic tree."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for channel in CHANNELS:
        name = channel.key[0].upper() + channel.key[1:]
        messages[name] = _described(channel, name)
        channels[channel.key] = {
            "address": channel.template(),
            "title": channel.key,
            "summary": channel.summary,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        } | (
            {"parameters": {p.name: {"description": p.description} for p in channel.params}}
            if channel.params
            else {}
        )
        operations.update(_operations(channel, name))
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "edgefleet",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": (
                f"The MQTT topic tree (prefix `{PREFIX}`) between the edgefleet coordinator,"
                " the devices' agents, operators and dashboards. Payloads are msgpack maps"
                " described by JSON Schemas (field `v` is the schema version). `send` is a"
                " publish to the broker, `receive` a subscription; each operation names the"
                " accounts the broker's ACL lets do it. Generated from `schemas/` and"
                " `broker/acl.py` by `edgefleet asyncapi`: do not edit by hand."
            ),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/msgpack",
        "servers": _servers(),
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": _schemas(),
            "securitySchemes": {
                "deviceCertificate": {
                    "type": "X509",
                    "description": "A certificate of the fleet's CA; its CN is the device id.",
                },
                "account": {
                    "type": "userPassword",
                    "description": "A broker account of the fleet home (one session each).",
                },
            },
            "tags": {role: {"name": role, "description": text} for role, text in ROLES.items()},
        },
    }


def render() -> str:
    """The document as committed: JSON, two-space indented, a newline at the end."""
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


def _asyncapi(args: argparse.Namespace) -> int:
    text = render()
    out = Path(args.out) if args.out else DOCUMENT
    if args.check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is not what `edgefleet asyncapi` generates: run it", file=sys.stderr)
            return 1
        return 0
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out.write_text(text, encoding="utf-8")
    print(out)
    return 0


def add_asyncapi_command(sub: Commands[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "asyncapi", help="write the AsyncAPI 3.0 document of the wire contract (from schemas/)"
    )
    p.add_argument("--out", help=f"where to write it ('-': stdout; default: {DOCUMENT})")
    p.add_argument(
        "--check", action="store_true", help="exit 1 if the file differs from what is generated"
    )
    p.set_defaults(func=_asyncapi)
