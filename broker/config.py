"""Render the repo's ``mosquitto.conf`` for a concrete folder, set of ports and account.

The repo-root ``mosquitto.conf`` is the single source of truth for the broker's settings;
tests and installs render it rather than keeping their own copies, so what is tested is
what ships.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "TEMPLATE_ROOT",
    "BrokerPorts",
    "ConfigError",
    "default_template",
    "render_config",
]

#: The path prefix used in ``mosquitto.conf``; :func:`render_config` replaces it.
TEMPLATE_ROOT = "/var/lib/edgefleet/broker/"

_LISTENER = re.compile(
    r"^(?P<indent>[ \t]*)listener[ \t]+(?P<port>\d+)(?:[ \t]+\S+)?[ \t]*$", re.MULTILINE
)
_USER = re.compile(r"^[ \t]*user[ \t]+\S+[ \t]*$", re.MULTILINE)
_LISTENER_NAMES = ("devices", "services", "websockets")


class ConfigError(ValueError):
    """The template is not a config this module knows how to render."""


@dataclass(frozen=True, kw_only=True)
class BrokerPorts:
    """TCP ports of the three listeners, in the order they appear in the config."""

    devices: int
    services: int
    websockets: int

    def as_tuple(self) -> tuple[int, int, int]:
        """The ports in listener order."""
        return (self.devices, self.services, self.websockets)


def default_template() -> str:
    """Return the text of the project's ``mosquitto.conf``.

    Looks for the repo-root file next to this package (a source checkout, the normal case),
    then for a ``mosquitto.conf`` shipped inside the ``broker`` package (an installed wheel).

    Raises:
        ConfigError: neither file exists.
    """
    repo_file = Path(__file__).resolve().parent.parent / "mosquitto.conf"
    if repo_file.is_file():
        return repo_file.read_text(encoding="utf-8")
    packaged = resources.files("broker").joinpath("mosquitto.conf")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    msg = f"mosquitto.conf not found at {repo_file} nor as package data of 'broker'"
    raise ConfigError(msg)


def render_config(
    template: str,
    *,
    folder: Path,
    ports: BrokerPorts,
    run_as: str | None = None,
    bind_address: str | None = None,
) -> str:
    """Render ``template`` for a broker living in ``folder``.

    Replaces the :data:`TEMPLATE_ROOT` path prefix with ``folder``, the ports of the three
    listeners (devices, services, websockets, by order of appearance), and, when given,
    sets the ``user`` Mosquitto drops privileges to and the address every listener binds.

    Raises:
        ConfigError: the template does not have exactly three ``listener`` lines, or
            ``folder`` / ``run_as`` / ``bind_address`` contain whitespace (Mosquitto's
            config syntax cannot quote them).
    """
    for name, value in (("folder", str(folder)), ("run_as", run_as), ("bind", bind_address)):
        if value is not None and (not value or any(c.isspace() for c in value)):
            msg = f"{name} {value!r} cannot be written into mosquitto.conf"
            raise ConfigError(msg)
    listeners = list(_LISTENER.finditer(template))
    if len(listeners) != len(_LISTENER_NAMES):
        msg = (
            f"expected {len(_LISTENER_NAMES)} listener lines ({', '.join(_LISTENER_NAMES)}),"
            f" found {len(listeners)}"
        )
        raise ConfigError(msg)

    port_iter = iter(ports.as_tuple())

    def _listener(match: re.Match[str]) -> str:
        line = f"{match['indent']}listener {next(port_iter)}"
        return f"{line} {bind_address}" if bind_address else line

    text = _LISTENER.sub(_listener, template)
    root = str(folder).rstrip("/") + "/"
    text = text.replace(TEMPLATE_ROOT, root)
    if run_as is not None:
        # ``user`` is a global option: when added, it must come before the first listener.
        has_user = _USER.search(text) is not None
        text = _USER.sub(f"user {run_as}", text) if has_user else f"user {run_as}\n{text}"
    return text
