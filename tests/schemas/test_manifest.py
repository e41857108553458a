"""Manifest targeting: stable buckets, canaries, and waves that only ever grow."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas import Manifest, Release, RolloutCohort, bucket
from schemas.manifest import BUCKETS, MAX_SEQ

DEVICES = [f"dev-{i:05d}" for i in range(10_000)]
SALT = "rollout-42-salt"


def _with_cutoff(manifest: Manifest, cutoff_bp: int) -> Manifest:
    assert manifest.rollout is not None
    cohort = manifest.rollout.model_copy(update={"cutoff_bp": cutoff_bp})
    return manifest.model_copy(update={"rollout": cohort})


def _on_candidate(manifest: Manifest) -> set[str]:
    return {d for d in DEVICES if manifest.target_for(d).rollout_id is not None}


def test_bucket_is_stable_across_calls_and_in_range() -> None:
    first = [bucket(SALT, d) for d in DEVICES[:500]]
    assert first == [bucket(SALT, d) for d in DEVICES[:500]]
    assert all(0 <= b < BUCKETS for b in first)
    # Pinned values: coordinator and agents must agree on them, and a changed hash
    # would silently reshuffle every fleet in the middle of a rollout.
    assert bucket("salt", "dev-00001") == 1513
    assert bucket(SALT, "dev-00000") == 9043


def test_bucket_is_roughly_uniform_over_ten_thousand_devices() -> None:
    deciles = Counter(bucket(SALT, d) * 10 // BUCKETS for d in DEVICES)
    assert set(deciles) == set(range(10))
    for decile, n in deciles.items():
        assert abs(n / len(DEVICES) - 0.10) <= 0.03, f"decile {decile} holds {n}"


def test_another_salt_reshuffles_the_buckets() -> None:
    a = [bucket("salt-a", d) for d in DEVICES[:1000]]
    b = [bucket("salt-b", d) for d in DEVICES[:1000]]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert same < 10


def test_canary_gets_the_candidate_whatever_the_cutoff(
    manifest: Manifest, candidate_release: Release
) -> None:
    for cutoff in (0, 1, 5000, BUCKETS):
        target = _with_cutoff(manifest, cutoff).target_for("dev-canary-1")
        assert target.release == candidate_release
        assert target.rollout_id == "rollout-42"


def test_cutoff_zero_puts_nobody_but_canaries_on_the_candidate(
    manifest: Manifest, release: Release
) -> None:
    zero = _with_cutoff(manifest, 0)
    assert _on_candidate(zero) == set()
    assert zero.target_for(DEVICES[0]).release == release


def test_cutoff_full_puts_everyone_on_the_candidate(
    manifest: Manifest, candidate_release: Release
) -> None:
    full = _with_cutoff(manifest, BUCKETS)
    assert _on_candidate(full) == set(DEVICES)
    assert all(full.target_for(d).release == candidate_release for d in DEVICES[:100])


def test_raising_the_cutoff_only_adds_devices(manifest: Manifest) -> None:
    previous: set[str] = set()
    for cutoff in (0, 1, 100, 1000, 2500, 5000, 9999, BUCKETS):
        wave = _on_candidate(_with_cutoff(manifest, cutoff))
        assert previous <= wave, f"cutoff {cutoff} dropped {sorted(previous - wave)[:5]}"
        # The wave's size tracks its cutoff within the same ±3 points as the deciles.
        assert abs(len(wave) / len(DEVICES) - cutoff / BUCKETS) <= 0.03
        previous = wave


def test_no_rollout_means_stable_for_everyone(manifest: Manifest, release: Release) -> None:
    plain = manifest.model_copy(update={"rollout": None})
    for device in ("dev-canary-1", *DEVICES[:100]):
        target = plain.target_for(device)
        assert target.release == release
        assert target.rollout_id is None


def test_empty_class_manifest_targets_nothing(manifest: Manifest) -> None:
    empty = manifest.model_copy(update={"stable": None, "rollout": None})
    assert empty.target_for("dev-00001").release is None


def test_release_id_names_the_release_and_its_digest(release: Release) -> None:
    assert release.release_id == f"resnet50-int8@{release.artifact.sha256[:12]}"


@pytest.mark.parametrize("cutoff", [-1, BUCKETS + 1])
def test_cutoff_outside_the_bucket_range_is_refused(manifest: Manifest, cutoff: int) -> None:
    assert manifest.rollout is not None
    with pytest.raises(ValueError, match="cutoff_bp"):
        RolloutCohort.model_validate({**manifest.rollout.model_dump(), "cutoff_bp": cutoff})


@pytest.mark.parametrize("seq", [0, MAX_SEQ + 1, 2**64 - 1])
def test_seq_outside_what_can_be_continued_is_refused(manifest: Manifest, seq: int) -> None:
    with pytest.raises(ValueError, match="seq"):
        Manifest.model_validate({**manifest.model_dump(), "seq": seq})
    assert Manifest.model_validate({**manifest.model_dump(), "seq": MAX_SEQ}).seq == MAX_SEQ
