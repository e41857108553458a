"""A device's settings: a TOML file, EDGEFLEET_* overrides, flags; every bad value named
with where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import MAX_CONFIG_BYTES, DeviceSettings, LogFormat, load_settings
from schemas import UsageError


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_the_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    file = _file(
        tmp_path,
        'bundle = "/etc/edgefleet/device"\ndata = "/var/lib/a"\ninference_hz = 5\n'
        'log_format = "json"\nretry_s = 2.5\n',
    )
    environ = {
        "EDGEFLEET_DATA": "/var/lib/b",
        "EDGEFLEET_INFERENCE_HZ": "7.5",
        "EDGEFLEET_HOME": "/somewhere",  # the fleet home: not a device setting
        "OTHER": "x",
    }
    settings = load_settings(file, environ, {"data": Path("/var/lib/c"), "source": None})

    assert settings.bundle == Path("/etc/edgefleet/device")
    assert settings.data == Path("/var/lib/c")
    assert settings.log_format is LogFormat.JSON
    config = settings.agent_config()
    assert config.data_dir == Path("/var/lib/c")
    assert config.inference_hz == 7.5
    assert config.retry_s == 2.5
    assert config.telemetry_window_s == 10.0, "unset: the agent's default"


def test_without_a_data_folder_it_is_in_the_bundle() -> None:
    settings = load_settings(None, {"EDGEFLEET_BUNDLE": "/b"}, {})
    assert settings.agent_config().data_dir == Path("/b/data")


def test_no_bundle_anywhere_says_where_to_give_one() -> None:
    with pytest.raises(UsageError, match="EDGEFLEET_BUNDLE"):
        DeviceSettings().agent_config()


@pytest.mark.parametrize(
    ("text", "environ", "where"),
    [
        ("inference_hz = 0\n", {}, "agent.toml: inference_hz"),
        ("no_such_key = 1\n", {}, "agent.toml: no_such_key"),
        ("", {"EDGEFLEET_OUTBOX_MAX_ITEMS": "many"}, "EDGEFLEET_OUTBOX_MAX_ITEMS"),
        ("", {"EDGEFLEET_LOG_FORMAT": "xml"}, "EDGEFLEET_LOG_FORMAT"),
        ("", {"EDGEFLEET_RETRY_S": "1e9"}, "EDGEFLEET_RETRY_S"),
        ("[agent\n", {}, "not TOML"),
        ("\xff", {}, "agent.toml"),
    ],
)
def test_a_bad_setting_is_named_with_where_it_came_from(
    tmp_path: Path, text: str, environ: dict[str, str], where: str
) -> None:
    file = tmp_path / "agent.toml"
    file.write_bytes(text.encode("latin-1"))
    with pytest.raises(UsageError, match=where) as caught:
        load_settings(file, environ, {})
    assert len(str(caught.value)) <= 300


def test_an_oversized_or_missing_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    big = _file(tmp_path, "# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(UsageError, match="over"):
        load_settings(big, {}, {})
    with pytest.raises(UsageError, match="No such file"):
        load_settings(tmp_path / "missing.toml", {}, {})


def test_the_example_config_in_the_repo_loads() -> None:
    example = Path(__file__).parents[2] / "deploy" / "agent.toml"
    settings = load_settings(example, {}, {})
    assert settings.log_format is LogFormat.JSON
    assert settings.agent_config().data_dir == Path("/var/lib/edgefleet")


@pytest.mark.parametrize(
    ("serve", "host", "port", "unix"),
    [
        ("8000", "127.0.0.1", 8000, None),
        ("0.0.0.0:8080", "0.0.0.0", 8080, None),
        ("[::1]:9000", "::1", 9000, None),
        ("unix:/run/edgefleet/infer.sock", "127.0.0.1", 8000, Path("/run/edgefleet/infer.sock")),
    ],
)
def test_the_endpoint_is_set_by_one_address(
    serve: str, host: str, port: int, unix: Path | None
) -> None:
    settings = load_settings(None, {"EDGEFLEET_SERVE": serve}, {"bundle": Path("/b")})
    endpoint = settings.agent_config().serve
    assert endpoint is not None
    assert (endpoint.host, endpoint.port, endpoint.unix_path) == (host, port, unix)


@pytest.mark.parametrize("serve", ["", "host:", "99999", "unix:relative", "a b:80", "x" * 300])
def test_a_bad_endpoint_address_is_refused(serve: str) -> None:
    with pytest.raises(UsageError, match="serve"):
        load_settings(None, {}, {"bundle": Path("/b"), "serve": serve}).agent_config()


def test_no_endpoint_unless_asked_and_the_inbox_takes_its_tunables(tmp_path: Path) -> None:
    file = _file(tmp_path, 'bundle = "/b"\nfolder = "/srv/inbox"\nfolder_keep = 50\n')
    settings = load_settings(
        file, {"EDGEFLEET_PROVIDERS": "OpenVINOExecutionProvider, CPUExecutionProvider"}, {}
    )
    config = settings.agent_config()
    assert config.serve is None
    assert config.providers == ("OpenVINOExecutionProvider", "CPUExecutionProvider")
    inbox = settings.inbox_config()
    assert inbox is not None
    assert (inbox.root, inbox.keep) == (Path("/srv/inbox"), 50)
