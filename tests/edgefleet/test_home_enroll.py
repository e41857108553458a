"""Enrolling many devices at once (``Home.enroll_many``): every bundle written, the device
list written once with all of them, and nothing written when one id is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bundle import Bundle
from edgefleet.home import OPERATOR, Home
from schemas import UsageError

CLASS = "sim-camera"


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home.init(tmp_path / "home")


def test_enroll_many_writes_every_bundle_and_lists_them_all(home: Home) -> None:
    home.enroll("cam-0", "other-class")
    wanted = [(f"sim-{i}", CLASS) for i in range(12)]
    folders = home.enroll_many(wanted, classes=(CLASS,))

    assert [f.name for f in folders] == [d for d, _ in wanted]
    assert home.devices() == {"cam-0": "other-class"} | dict(wanted)
    for folder in folders:
        bundle = Bundle.load(folder)
        assert (bundle.device_id, bundle.hw_class) == (folder.name, CLASS)
        assert bundle.root_public_keys().keys() == home.root_public_keys().keys()
        assert (folder / bundle.cert_file).read_bytes().startswith(b"-----BEGIN CERTIFICATE")
        assert (folder / bundle.key_file).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("wanted", "complaint"),
    [
        ([("sim-1", CLASS), ("sim-1", CLASS)], "'sim-1' is taken"),
        ([("sim-1", CLASS), ("cam-0", CLASS)], "'cam-0' is taken"),
        ([("sim-1", CLASS), (OPERATOR, CLASS)], f"{OPERATOR!r} is taken"),
        ([("sim-1", CLASS), ("sim-2", "toaster")], "no profile defines class 'toaster'"),
    ],
)
def test_enroll_many_refusing_one_id_writes_nothing(
    home: Home, wanted: list[tuple[str, str]], complaint: str
) -> None:
    home.enroll("cam-0", CLASS)
    with pytest.raises(UsageError, match=complaint):
        home.enroll_many(wanted, classes=(CLASS,))
    assert home.devices() == {"cam-0": CLASS}
    assert not (home.root / "devices" / "sim-1").exists()


def test_enroll_many_refuses_a_malformed_id_before_writing(home: Home) -> None:
    with pytest.raises(ValueError, match="device id"):
        home.enroll_many([("sim-1", CLASS), ("bad/id", CLASS)])
    assert home.devices() == {}
