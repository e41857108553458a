"""``coordinator run --metrics``: the address is checked before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cli import main


@pytest.mark.parametrize("address", ["nine", "host:", "[::1]:99999"])
def test_a_bad_metrics_address_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    home = str(tmp_path / "home")
    assert main(["--home", home, "keys", "init"]) == 0
    capsys.readouterr()
    assert main(["--home", home, "coordinator", "run", "--metrics", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgefleet: ")
    assert "metrics" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "home" / "coordinator-data").exists()
