"""The enrollment bundle: the device's first trust anchor must be exactly the root key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.bundle import BUNDLE_FILE, Bundle
from schemas import KeyPair, public_raw


def _bundle(root_keys: dict[str, str]) -> Bundle:
    return Bundle(
        device_id="dev-0001",
        hw_class="jetson-vision-standard",
        root_keys=root_keys,
        broker_host="broker.example",
        broker_port=8883,
    )


def test_bundle_round_trips_and_yields_its_root_key(tmp_path: Path) -> None:
    root = KeyPair.generate()
    (tmp_path / BUNDLE_FILE).write_bytes(_bundle({root.id: public_raw(root.public).hex()}).dump())

    loaded = Bundle.load(tmp_path)
    keys = loaded.root_public_keys()
    assert list(keys) == [root.id]
    assert public_raw(keys[root.id]) == public_raw(root.public)


def test_bundle_whose_root_key_id_does_not_match_its_bytes_is_refused() -> None:
    root, impostor = KeyPair.generate(), KeyPair.generate()
    swapped = _bundle({root.id: public_raw(impostor.public).hex()})
    with pytest.raises(ValueError, match="does not match"):
        swapped.root_public_keys()


def test_bundle_with_a_root_key_that_is_not_ed25519_bytes_is_refused() -> None:
    root = KeyPair.generate()
    with pytest.raises(ValueError):  # noqa: PT011 - cryptography's message is not ours
        _bundle({root.id: public_raw(root.public)[:31].hex()}).root_public_keys()


def test_bundle_with_unknown_fields_is_refused(tmp_path: Path) -> None:
    root = KeyPair.generate()
    text = _bundle({root.id: public_raw(root.public).hex()}).dump().decode()
    (tmp_path / BUNDLE_FILE).write_text(text.replace("{", '{"insecure": true,', 1))
    with pytest.raises(ValidationError):
        Bundle.load(tmp_path)
