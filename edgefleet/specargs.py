"""The arguments ``rollout start`` and ``rollout plan`` share: what the spec says, read
from the command line (and a waves file) into :class:`edgefleet.compose.SpecOptions`.

Waves: ``--waves 5dev,25,100`` — a plain number (or ``25%``) is a percent of each class,
``Ndev`` the first N devices of each class by bucket. ``--waves-file`` reads a list of
wave tables (TOML ``[[waves]]`` or JSON) with per-wave ratios, soak, silence and timeout.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import tomllib
from pathlib import Path
from typing import Any, Final

from coordinator.profiles import DEFAULT_PROFILES
from edgefleet.compose import SpecOptions
from schemas import MaintenanceWindow, ShadowBudget, UsageError, WaveSpec
from schemas.errors import bound_text
from schemas.topics import check_name

__all__ = [
    "add_spec_arguments",
    "parse_waves",
    "parse_window",
    "read_waves_file",
    "rollout_id_of",
    "shadow_of",
    "spec_options",
]

_COUNT: Final = re.compile(r"^(\d+)\s*dev(?:ices?)?$")
_PERCENT: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*%?$")
_WINDOW: Final = re.compile(r"^([^=]+)=(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
MAX_WAVES_FILE_BYTES: Final = 64 * 1024
"""A waves file is a few tables; anything larger is not one."""
_WAVE_KEYS: Final = frozenset(WaveSpec.model_fields) - {"v"}


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """The model, classes and spec options of a rollout, as ``start`` and ``plan`` take them."""
    p.add_argument("--class", dest="hw_class", action="append", required=True)
    p.add_argument(
        "--model",
        required=True,
        help="an ONNX file, or a folder of variants written by 'edgefleet model optimize'",
    )
    p.add_argument("--name", help="release name (default: the bundle's or the file's name)")
    p.add_argument(
        "--classes",
        default=str(DEFAULT_PROFILES),
        help="class profiles to check the variants against before publishing",
    )
    waves = p.add_mutually_exclusive_group()
    waves.add_argument(
        "--waves",
        default="10,50,100",
        help="waves in order: N or N%% (percent of each class), Ndev (the first N devices "
        "of each class by bucket); count waves first, the last 100 (default: 10,50,100)",
    )
    waves.add_argument(
        "--waves-file",
        help="TOML ([[waves]] tables) or JSON (a list) of waves with percent or count and "
        "optional min_soak_s, success_ratio, max_failure_ratio, silence_s, timeout_s",
    )
    p.add_argument("--canary", action="append", default=[], help="device in every wave")
    p.add_argument("--success-ratio", type=float, help="healthy share that promotes a wave")
    p.add_argument("--max-failure-ratio", type=float, help="failed share that rolls back")
    p.add_argument("--wave-timeout", type=float, help="seconds before a stuck wave rolls back")
    p.add_argument("--min-soak", type=float, help="seconds a wave runs at least before promotion")
    p.add_argument(
        "--silence", type=float, help="seconds without a verdict after which a device counts failed"
    )
    p.add_argument("--rate", type=int, help="at most N devices of a class newly targeted a minute")
    p.add_argument(
        "--all-or-nothing",
        action="store_true",
        help="one class failing rolls every class back; none is promoted before all passed",
    )
    p.add_argument(
        "--window",
        action="append",
        default=[],
        metavar="CLASS=HH:MM-HH:MM",
        help="a daily UTC window in which CLASS may be newly targeted (repeatable)",
    )
    p.add_argument(
        "--shadow",
        type=float,
        metavar="MIN_AGREEMENT",
        help="soak each candidate beside its class's stable model, never answering, and "
        "refuse it below this share of answers whose labels agree (default: the class's)",
    )
    p.add_argument(
        "--shadow-tolerance",
        type=float,
        metavar="T",
        help="with --shadow: an answer agrees when every value of the first float output "
        "is within T of the stable model's (instead of its labels)",
    )
    p.add_argument("--id", help="rollout id (default: name-timestamp); it salts the buckets")


def rollout_id_of(args: argparse.Namespace) -> str:
    """The rollout id the command line names, or ``name-timestamp``.

    Raises:
        ValueError: not a valid name.
    """
    return check_name(
        args.id or f"{args.name or Path(args.model).stem}-{int(time.time())}", "rollout id"
    )


def spec_options(args: argparse.Namespace) -> SpecOptions:
    """The spec options of a ``start`` or ``plan`` command line.

    Raises:
        UsageError: a wave, window or waves file that cannot be read.
        OSError: the waves file cannot be opened.
        pydantic.ValidationError: values out of the spec's bounds.
    """
    waves = read_waves_file(Path(args.waves_file)) if args.waves_file else parse_waves(args.waves)
    windows = dict(parse_window(text) for text in args.window)
    if len(windows) != len(args.window):
        msg = "--window names a class twice"
        raise UsageError(msg)
    return SpecOptions(
        waves=waves,
        canaries=tuple(args.canary),
        success_ratio=args.success_ratio,
        max_failure_ratio=args.max_failure_ratio,
        wave_timeout_s=args.wave_timeout,
        min_soak_s=args.min_soak,
        silence_s=args.silence,
        rate_per_min=args.rate,
        all_or_nothing=args.all_or_nothing,
        windows=windows,
        shadow=shadow_of(args),
    )


def shadow_of(args: argparse.Namespace) -> ShadowBudget | None:
    """The shadow soak ``--shadow`` and ``--shadow-tolerance`` ask for, if any.

    Raises:
        UsageError: a tolerance without ``--shadow``.
        pydantic.ValidationError: values out of bounds.
    """
    if args.shadow is None:
        if args.shadow_tolerance is not None:
            msg = "--shadow-tolerance needs --shadow"
            raise UsageError(msg)
        return None
    if args.shadow_tolerance is None:
        return ShadowBudget(min_agreement=args.shadow)
    return ShadowBudget(
        min_agreement=args.shadow, measure="distance", tolerance=args.shadow_tolerance
    )


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """``5dev,25,100`` as waves.

    Raises:
        UsageError: an item that is neither a percent nor a count.
        pydantic.ValidationError: a percent or count out of bounds.
    """
    waves = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if count := _COUNT.match(item):
            waves.append(WaveSpec(count=int(count.group(1))))
        elif percent := _PERCENT.match(item):
            waves.append(WaveSpec(percent=float(percent.group(1))))
        else:
            msg = (
                f"--waves: {bound_text(raw.strip(), 40)!r} is neither a percent (25, 25%) "
                "nor a count (5dev)"
            )
            raise UsageError(msg)
    return tuple(waves)


def parse_window(text: str) -> tuple[str, MaintenanceWindow]:
    """``CLASS=HH:MM-HH:MM`` (UTC) as a class and its window.

    Raises:
        UsageError: another shape, or an hour or minute out of range.
        ValueError: not a valid class name.
    """
    match = _WINDOW.match(text.strip())
    if match is None:
        msg = f"--window: {bound_text(text, 80)!r} is not CLASS=HH:MM-HH:MM"
        raise UsageError(msg)
    hw_class = check_name(match.group(1).strip(), "class")
    h1, m1, h2, m2 = (int(g) for g in match.groups()[1:])
    if max(h1, h2) > 23 or max(m1, m2) > 59:
        msg = f"--window: {bound_text(text, 80)!r} is not a time of day (00:00-23:59)"
        raise UsageError(msg)
    return hw_class, MaintenanceWindow(start_minute=h1 * 60 + m1, end_minute=h2 * 60 + m2)


def read_waves_file(path: Path) -> tuple[WaveSpec, ...]:
    """Waves from a TOML file (``[[waves]]`` tables) or a JSON file (a list of objects,
    or ``{"waves": [...]}``).

    Raises:
        OSError: the file cannot be read.
        UsageError: too large, not TOML or JSON, no list of tables, unknown keys.
        pydantic.ValidationError: a wave out of bounds.
    """
    with path.open("rb") as f:
        data = f.read(MAX_WAVES_FILE_BYTES + 1)
    if len(data) > MAX_WAVES_FILE_BYTES:
        msg = f"{path}: over {MAX_WAVES_FILE_BYTES} bytes; a waves file is a few tables"
        raise UsageError(msg)
    parsed = _parse_document(path, data)
    tables = parsed.get("waves") if isinstance(parsed, dict) else parsed
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        msg = f"{path}: expected a list of wave tables ([[waves]] in TOML, a list in JSON)"
        raise UsageError(msg)
    waves = []
    for i, table in enumerate(tables, 1):
        unknown = sorted(str(k) for k in set(table) - _WAVE_KEYS)
        if unknown:
            msg = (
                f"{path}: wave {i}: unknown keys {bound_text(str(unknown), 120)}; "
                f"known: {sorted(_WAVE_KEYS)}"
            )
            raise UsageError(msg)
        waves.append(WaveSpec.model_validate(table))
    return tuple(waves)


def _parse_document(path: Path, data: bytes) -> Any:
    try:
        text = data.decode()
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        msg = f"{path}: not {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}"
        raise UsageError(bound_text(msg, 250)) from exc
