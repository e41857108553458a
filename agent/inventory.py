"""What the device is: gathered once at the agent's start, free disk on each publish.

The retained state carries it (:class:`schemas.Inventory`), so operators and the
coordinator can target and debug by architecture, memory, execution providers and
versions without logging in to the device. Every value is read cheaply (a few ``sysfs``
files, one ``statvfs``); every text is cut to the wire's bound where it is read.
"""

from __future__ import annotations

import contextlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Final

import onnxruntime as ort

from schemas import Inventory

__all__ = ["THERMAL", "DeviceInventory", "free_disk", "hottest_zone"]

THERMAL: Final = Path("/sys/class/thermal")
_MAX_ZONES: Final = 64
_LABEL: Final = 64


def _label(text: str) -> str:
    return text[:_LABEL]


def free_disk(folder: Path) -> int | None:
    """Bytes free for an unprivileged writer where ``folder`` is (or will be: its
    nearest existing parent); None when even that cannot be read."""
    for candidate in (folder, *folder.parents):
        try:
            stat = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize
    return None


def hottest_zone(thermal: Path = THERMAL) -> float | None:
    """The highest temperature, in °C, of the thermal zones the OS exposes; None when
    there are none (containers, most VMs) or none reads as a number."""
    hottest: float | None = None
    with contextlib.suppress(OSError):
        zones = sorted(thermal.glob("thermal_zone*"))[:_MAX_ZONES]
        for zone in zones:
            try:
                millis = int((zone / "temp").read_text(encoding="ascii").strip()[:16])
            except (OSError, ValueError):
                continue
            celsius = millis / 1000.0
            if -100.0 < celsius < 250.0 and (hottest is None or celsius > hottest):
                hottest = celsius
    return hottest


def _agent_version() -> str:
    try:
        return version("edgefleet")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


class DeviceInventory:
    """The inventory of one device; :meth:`current` refreshes the free disk."""

    def __init__(self, data_dir: Path, *, thermal: Path = THERMAL) -> None:
        """Blocking (a few small reads): construct it before the loop, or in a thread."""
        self._data_dir = data_dir
        self._base = Inventory(
            arch=_label(platform.machine() or "unknown"),
            os=_label(f"{platform.system()} {platform.release()}".strip() or "unknown"),
            cores=os.cpu_count() or 0,
            ram_bytes=_ram_bytes(),
            providers=tuple(_label(p) for p in ort.get_available_providers()[:16]),
            onnxruntime=_label(ort.__version__),
            agent=_label(_agent_version()),
            temperature_c=hottest_zone(thermal),
            disk_free_bytes=free_disk(data_dir),
        )

    def current(self) -> Inventory:
        """The inventory with the free disk as it is now (one ``statvfs``)."""
        return self._base.model_copy(update={"disk_free_bytes": free_disk(self._data_dir)})
