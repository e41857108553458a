"""The spec options ``rollout start`` and ``rollout plan`` read from a command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgefleet.specargs import (
    MAX_WAVES_FILE_BYTES,
    add_spec_arguments,
    parse_waves,
    parse_window,
    read_waves_file,
    spec_options,
)
from schemas import MaintenanceWindow, ShadowBudget, UsageError, WaveSpec

CAM = "jetson-vision-standard"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    return parser.parse_args(["--class", CAM, "--model", "m.onnx", *argv])


def test_waves_are_counts_then_percents_in_a_plain_list() -> None:
    assert parse_waves("5dev, 2devices,25%,100") == (
        WaveSpec(count=5),
        WaveSpec(count=2),
        WaveSpec(percent=25.0),
        WaveSpec(percent=100.0),
    )
    assert parse_waves("0.5,100") == (WaveSpec(percent=0.5), WaveSpec(percent=100.0))


@pytest.mark.parametrize("bad", ["10,abc", "5 dogs,100", "-5,100", "10,,100", "x" * 500])
def test_a_wave_that_is_no_percent_nor_count_is_one_bounded_error(bad: str) -> None:
    with pytest.raises(UsageError, match="neither a percent") as refused:
        parse_waves(bad)
    assert len(str(refused.value)) < 160


def test_out_of_range_waves_are_refused_by_the_schema() -> None:
    with pytest.raises(ValidationError):
        parse_waves("0dev,100")
    with pytest.raises(ValidationError):
        parse_waves("150")


def test_windows_are_utc_minutes_and_may_span_midnight() -> None:
    assert parse_window(f"{CAM}=22:30-04:05") == (
        CAM,
        MaintenanceWindow(start_minute=22 * 60 + 30, end_minute=4 * 60 + 5),
    )
    for bad in (f"{CAM}=25:00-01:00", f"{CAM}=10:00", "22:00-23:00", f"{CAM}=1:60-2:00"):
        with pytest.raises(UsageError, match="--window"):
            parse_window(bad)
    with pytest.raises(ValueError, match="invalid class"):
        parse_window("a/b=01:00-02:00")


def test_every_option_reaches_the_spec_options() -> None:
    options = spec_options(
        _args(
            "--waves",
            "3dev,100",
            "--canary",
            "cam-1",
            "--success-ratio",
            "0.9",
            "--max-failure-ratio",
            "0.1",
            "--wave-timeout",
            "600",
            "--min-soak",
            "60",
            "--silence",
            "120",
            "--rate",
            "50",
            "--all-or-nothing",
            "--window",
            f"{CAM}=01:00-03:00",
        )
    )
    assert options.waves == (WaveSpec(count=3), WaveSpec(percent=100.0))
    assert options.canaries == ("cam-1",)
    assert (options.success_ratio, options.max_failure_ratio, options.wave_timeout_s) == (
        0.9,
        0.1,
        600.0,
    )
    assert (options.min_soak_s, options.silence_s, options.rate_per_min) == (60.0, 120.0, 50)
    assert options.all_or_nothing
    assert options.windows == {CAM: MaintenanceWindow(start_minute=60, end_minute=180)}
    defaults = spec_options(_args())
    assert [w.percent for w in defaults.waves] == [10.0, 50.0, 100.0]
    assert (defaults.rate_per_min, defaults.all_or_nothing, dict(defaults.windows)) == (
        None,
        False,
        {},
    )


def test_a_shadow_soak_is_asked_by_label_agreement_or_by_distance() -> None:
    assert spec_options(_args()).shadow is None
    assert spec_options(_args("--shadow", "0.97")).shadow == ShadowBudget(min_agreement=0.97)
    distance = spec_options(_args("--shadow", "0.9", "--shadow-tolerance", "0.05")).shadow
    assert distance == ShadowBudget(min_agreement=0.9, measure="distance", tolerance=0.05)
    with pytest.raises(UsageError, match="needs --shadow"):
        spec_options(_args("--shadow-tolerance", "0.05"))
    with pytest.raises(ValidationError):
        spec_options(_args("--shadow", "1.5"))


def test_a_class_given_two_windows_is_refused() -> None:
    with pytest.raises(UsageError, match="twice"):
        spec_options(_args("--window", f"{CAM}=01:00-02:00", "--window", f"{CAM}=03:00-04:00"))


def test_waves_and_a_waves_file_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _args("--waves", "100", "--waves-file", str(tmp_path / "w.toml"))


def test_a_waves_file_in_toml_or_json_carries_each_wave_s_terms(tmp_path: Path) -> None:
    toml = tmp_path / "waves.toml"
    toml.write_text(
        "[[waves]]\ncount = 5\nmin_soak_s = 300\nsilence_s = 120\n"
        "[[waves]]\npercent = 25\nsuccess_ratio = 0.95\nmax_failure_ratio = 0.02\n"
        "[[waves]]\npercent = 100\ntimeout_s = 3600\n"
    )
    waves = read_waves_file(toml)
    assert waves == (
        WaveSpec(count=5, min_soak_s=300.0, silence_s=120.0),
        WaveSpec(percent=25.0, success_ratio=0.95, max_failure_ratio=0.02),
        WaveSpec(percent=100.0, timeout_s=3600.0),
    )
    listed = tmp_path / "waves.json"
    listed.write_text('[{"count": 5, "min_soak_s": 300, "silence_s": 120}, {"percent": 100}]')
    assert read_waves_file(listed)[0] == waves[0]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"waves": [{"percent": 100, "timeout_s": 3600}]}')
    assert read_waves_file(wrapped) == (waves[2],)
    assert spec_options(_args("--waves-file", str(toml))).waves == waves


@pytest.mark.parametrize(
    ("name", "content", "complaint"),
    [
        ("w.toml", "waves = 3", "list of wave tables"),
        ("w.toml", "[[waves]]\npercent = 100\nsoak = 3\n", "unknown keys ['soak']"),
        ("w.toml", "not = [toml", "not TOML"),
        ("w.json", "{nope", "not JSON"),
        ("w.json", "[]", "list of wave tables"),
        ("w.json", "[1, 2]", "list of wave tables"),
    ],
)
def test_a_bad_waves_file_is_one_clear_error(
    tmp_path: Path, name: str, content: str, complaint: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UsageError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        read_waves_file(path)


def test_a_huge_waves_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_bytes(b" " * (MAX_WAVES_FILE_BYTES + 1))
    with pytest.raises(UsageError, match="over"):
        read_waves_file(path)
