"""A device's configuration: a TOML file, ``EDGEFLEET_*`` environment overrides, flags.

Read only at the entry point (``edgefleet agent run --config FILE``), in that order of
precedence, lowest first: the defaults of :class:`agent.service.AgentConfig`, the file,
the environment (``EDGEFLEET_<KEY>``, e.g. ``EDGEFLEET_DATA=/var/lib/edgefleet``), the
command line. Every key is bounded; an unknown key, a value out of bounds or a file that
is not TOML is a :class:`~schemas.UsageError` naming where it came from.

An example (``deploy/agent.toml``)::

    bundle = "/etc/edgefleet/device"
    data = "/var/lib/edgefleet"
    log_format = "json"
    inference_hz = 20
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.folder import InboxConfig
from agent.serve import ServeConfig
from agent.service import AgentConfig
from broker.transport import listen_address
from schemas import UsageError
from schemas.errors import bound_text

__all__ = ["ENV_PREFIX", "MAX_CONFIG_BYTES", "DeviceSettings", "LogFormat", "load_settings"]

ENV_PREFIX: Final = "EDGEFLEET_"
MAX_CONFIG_BYTES: Final = 64 * 1024
"""A config file is a few lines; a bigger one is refused before it is parsed."""

_ERROR_CHARS: Final = 300


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"
    """One JSON object a line, for journald and log shippers."""


_NOT_AGENT_CONFIG: Final = {
    "bundle",
    "data",
    "source",
    "replay",
    "folder",
    "folder_keep",
    "image_scale",
    "log_format",
    "log_level",
    "serve",
    "serve_model_name",
}
"""The settings of the process, or built into parts of :class:`AgentConfig`."""
_LISTS: Final = {"providers"}
"""Settings that are lists: comma-separated in the environment."""

_Seconds = Field(default=None, gt=0, le=86_400)


class DeviceSettings(BaseModel):
    """What a device's config may set. ``None`` keeps :class:`AgentConfig`'s default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bundle: Path | None = None
    """The enrollment bundle's folder."""
    data: Path | None = None
    """The agent's data folder (default: ``<bundle>/data``)."""
    source: str | None = Field(default=None, max_length=64)
    """The built-in input source, by name (see ``edgefleet agent run --help``)."""
    replay: Path | None = None
    """A ``.npz`` of inputs replayed in a loop, instead of a simulated source."""
    folder: Path | None = None
    """An inbox: each file dropped into it is inferred once, its answer written beside
    it (:mod:`agent.folder`)."""
    folder_keep: int | None = Field(default=None, ge=1, le=1_000_000)
    image_scale: float | None = Field(default=None, gt=0, le=1e6)
    serve: str | None = Field(default=None, max_length=260)
    """The local inference endpoint: ``[HOST:]PORT`` (HOST defaults to 127.0.0.1) or
    ``unix:/PATH``; unset: no endpoint."""
    serve_model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """The model name the endpoint answers to (default: the hardware class)."""
    log_format: LogFormat = LogFormat.TEXT
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    inference_hz: float | None = Field(default=None, gt=0, le=1000)
    telemetry_window_s: float | None = _Seconds
    state_interval_s: float | None = _Seconds
    fetch_timeout_s: float | None = _Seconds
    outbox_max_items: int | None = Field(default=None, ge=10, le=1_000_000)
    outbox_max_events: int | None = Field(default=None, ge=10, le=100_000)
    flush_batch: int | None = Field(default=None, ge=1, le=10_000)
    resend_s: float | None = _Seconds
    resend_max_s: float | None = _Seconds
    reconnect_s: float | None = _Seconds
    retry_s: float | None = _Seconds
    retry_max_s: float | None = _Seconds
    stop_flush_s: float | None = Field(default=None, ge=0, le=600)
    providers: tuple[Annotated[str, Field(pattern=r"^[A-Za-z]{1,64}$")], ...] | None = Field(
        default=None, min_length=1, max_length=8
    )
    """Execution providers to try in order instead of the class's (e.g. pin a device to
    ``["CPUExecutionProvider"]`` while its accelerator is repaired)."""

    def agent_config(self) -> AgentConfig:
        """The agent's configuration: the tunables set here, the defaults for the rest.

        Raises:
            UsageError: no bundle is set (nor a data folder).
        """
        if self.bundle is None:
            msg = "no bundle: give --bundle, `bundle` in the config file or EDGEFLEET_BUNDLE"
            raise UsageError(msg)
        tunables = self.model_dump(exclude_none=True, exclude=_NOT_AGENT_CONFIG)
        data = self.data or self.bundle / "data"
        return AgentConfig(data_dir=data, serve=self.serve_config(), **tunables)

    @field_validator("serve")
    @classmethod
    def _endpoint_address(cls, serve: str | None) -> str | None:
        if serve is not None:
            _endpoint(serve, None)  # raises ValueError, told with where it came from
        return serve

    def serve_config(self) -> ServeConfig | None:
        """The endpoint :attr:`serve` asks for (None: none)."""
        return None if self.serve is None else _endpoint(self.serve, self.serve_model_name)

    def inbox_config(self) -> InboxConfig | None:
        """The inbox :attr:`folder` asks for (None: none)."""
        if self.folder is None:
            return None
        inbox = InboxConfig(root=self.folder)
        if self.folder_keep is not None:
            inbox = replace(inbox, keep=self.folder_keep)
        if self.image_scale is not None:
            inbox = replace(inbox, image_scale=self.image_scale)
        return inbox


def _endpoint(serve: str, model_name: str | None) -> ServeConfig:
    """The endpoint of a ``serve`` setting: ``unix:/PATH``, or ``[HOST:]PORT``.

    Raises:
        ValueError: neither.
    """
    if serve.startswith("unix:"):
        path = Path(serve.removeprefix("unix:"))
        if not path.is_absolute() or len(str(path)) > 200:
            msg = "a Unix socket needs an absolute path of at most 200 characters"
            raise ValueError(msg)
        return ServeConfig(unix_path=path, model_name=model_name)
    host, port = listen_address(serve)
    return ServeConfig(host=host, port=port, model_name=model_name)


def load_settings(
    file: Path | None,
    environ: Mapping[str, str],
    flags: Mapping[str, object],
) -> DeviceSettings:
    """The settings from ``file`` (if any), then ``environ``, then ``flags`` (None: unset).

    Raises:
        UsageError: the file is unreadable, too big, not TOML, or a key from any of the
            three is unknown or out of bounds (the message says which and where).
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if file is not None:
        layers.append((str(file), _read_file(file)))
    names = DeviceSettings.model_fields
    env: dict[str, Any] = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in names
    }
    for key in _LISTS & env.keys():
        env[key] = [item.strip() for item in env[key].split(",")]
    layers.append(("the environment", env))
    layers.append(("the command line", {k: v for k, v in flags.items() if v is not None}))
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for where, values in layers:
        for key, value in values.items():
            merged[key] = value
            origin[key] = ENV_PREFIX + key.upper() if where == "the environment" else where
    try:
        return DeviceSettings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        where = origin.get(key, "the settings")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        text = f"{where}: {key or 'config'}: {first['msg']}{more}"
        raise UsageError(bound_text(text, _ERROR_CHARS)) from None


def _read_file(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        msg = f"config file {file}: {exc.strerror or exc}"
        raise UsageError(bound_text(msg, _ERROR_CHARS)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        msg = f"config file {file}: over {MAX_CONFIG_BYTES} bytes"
        raise UsageError(bound_text(msg, _ERROR_CHARS))
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        msg = f"config file {file}: not TOML: {exc}"
        raise UsageError(bound_text(msg, _ERROR_CHARS)) from None
