"""What the dashboard's server answers, judged without I/O: which hosts, origins,
methods and paths it serves, the upgrade it forwards, and the page's files."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import pytest

from dashboard.relay import BrokerTarget, upgrade_request
from dashboard.routes import Refusal, Route, RouteKind, allowed_hosts, load_static, route

HOSTS = allowed_hosts("127.0.0.1", 8886)
FILES = load_static()
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = {
    "host": "127.0.0.1:8886",
    "upgrade": "websocket",
    "origin": "http://127.0.0.1:8886",
    "sec-websocket-key": KEY,
    "sec-websocket-version": "13",
    "sec-websocket-protocol": "mqtt",
}


def _get(target: str, **headers: str) -> Route:
    return route("GET", target, {"host": "127.0.0.1:8886", **headers}, hosts=HOSTS, files=FILES)


def _refused(target: str, method: str = "GET", **headers: str) -> int:
    with pytest.raises(Refusal) as refusal:
        route(method, target, headers, hosts=HOSTS, files=FILES)
    return refusal.value.status


def test_loopback_names_are_the_hosts_served() -> None:
    assert {"127.0.0.1:8886", "localhost:8886", "[::1]:8886"} == HOSTS
    assert allowed_hosts("192.0.2.7", 80) == {"192.0.2.7:80"}


def test_the_page_its_files_settings_and_audit_are_routed() -> None:
    assert _get("/") == Route(RouteKind.FILE, path="/index.html")
    assert _get("/js/app.js") == Route(RouteKind.FILE, path="/js/app.js")
    assert _get("/vendor/mqtt.min.js").kind is RouteKind.FILE
    assert _get("/config.json") == Route(RouteKind.CONFIG)
    assert _get("/audit.json") == Route(RouteKind.AUDIT)
    assert _get("/audit.json?rollout=v3") == Route(RouteKind.AUDIT, rollout="v3")
    assert route("GET", "/mqtt", UPGRADE, hosts=HOSTS, files=FILES) == Route(RouteKind.RELAY)


@pytest.mark.parametrize(
    "host",
    ["evil.example:8886", "127.0.0.1:9999", "", "127.0.0.1"],
    ids=["dns-rebinding", "other-port", "none", "no-port"],
)
def test_a_request_naming_another_host_is_refused(host: str) -> None:
    assert _refused("/config.json", host=host) == 403


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "", "null", "https://127.0.0.1:8886", "http://127.0.0.1:8887"],
)
def test_the_relay_serves_only_the_page_of_its_own_origin(origin: str) -> None:
    # A page of another site may open a WebSocket to any address (no same-origin rule):
    # the browser's Origin header is how the relay tells.
    assert _refused("/mqtt", **{**UPGRADE, "origin": origin}) == 403


def test_other_methods_paths_and_targets_are_refused() -> None:
    host = {"host": "127.0.0.1:8886"}
    assert _refused("/", method="POST", **host) == 405
    assert _refused("/../dashboard/server.py", **host) == 404
    assert _refused("/vendor/SHA256SUMS", **host) == 404  # not a file of the page
    assert _refused("/mqtt", **host) == 426  # a plain GET of the relay
    assert _refused("http://evil.example/", **host) == 400
    assert _refused("/" + "a" * 600, **host) == 400
    assert _refused("/audit.json?rollout=../x", **host) == 400
    assert _refused("/audit.json?" + "&".join(f"k{i}=v" for i in range(10)), **host) == 400


def test_the_upgrade_forwarded_to_the_broker_keeps_only_the_websocket_headers() -> None:
    target = BrokerTarget(host="broker.example", port=8885, ca_file=Path("ca.crt"))
    sent = upgrade_request({**UPGRADE, "cookie": "session=secret"}, target).decode()
    assert sent.split("\r\n") == [
        "GET /mqtt HTTP/1.1",
        "Host: broker.example:8885",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: mqtt",
        "",
        "",
    ]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("sec-websocket-key", "short"),
        ("sec-websocket-key", "a\r\nX-Injected: 1" + "=" * 10),
        ("sec-websocket-version", "8"),
        ("sec-websocket-protocol", "mqtt\r\nX-Injected: 1"),
    ],
)
def test_a_malformed_upgrade_is_refused_before_the_broker_sees_it(header: str, value: str) -> None:
    target = BrokerTarget(host="broker.example", port=8885, ca_file=Path("ca.crt"))
    with pytest.raises(Refusal) as refusal:
        upgrade_request({**UPGRADE, header: value}, target)
    assert refusal.value.status == 400


def test_the_vendored_libraries_are_those_the_fetch_script_pinned() -> None:
    vendor = resources.files("dashboard") / "static" / "vendor"
    sums = (vendor / "SHA256SUMS").read_text().split("\n")
    pinned = {name: digest for digest, name in (line.split("  ") for line in sums if line)}
    vendored = {"mqtt.min.js", "mqtt.LICENSE.md", "msgpack.min.js", "msgpack.LICENSE.txt"}
    assert set(pinned) == vendored
    for name, digest in pinned.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
        served = f"/vendor/{name}"
        assert served in FILES, served


def test_every_module_the_page_imports_is_served() -> None:
    html = FILES["/index.html"].body.decode()
    for script in ("vendor/msgpack.min.js", "vendor/mqtt.min.js", "js/app.js", "style.css"):
        assert script in html
        assert f"/{script}" in FILES
    modules = [p for p in FILES if p.startswith("/js/")]
    for path in modules:
        for line in FILES[path].body.decode().splitlines():
            if line.startswith("import ") and " from " in line:
                imported = line.rsplit('"', 2)[1]
                assert f"/js/{imported.removeprefix('./')}" in FILES, (path, imported)
    assert FILES["/js/app.js"].content_type.startswith("text/javascript")
