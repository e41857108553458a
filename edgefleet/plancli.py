"""``edgefleet rollout plan``: the dry run of ``rollout start``. Same arguments; reads the
retained fleet state with the read-only ``watcher`` account, publishes nothing, and prints
wave by wave which devices each wave reaches, the bytes it pulls, which variant each class
gets and what its accuracy gate measured here (``coordinator.plan`` plans; this reads)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from coordinator.admission import Scores, first_passing, gate_data
from coordinator.operator import (
    DeviceRow,
    VariantFile,
    read_fleet,
    read_manifests,
    read_status,
)
from coordinator.plan import ClassOffer, ClassWave, Plan, WavePlan, WaveTerms, make_plan
from coordinator.profiles import ClassProfile, load_profiles
from coordinator.validate import ModelFacts
from coordinator.variants import Built, rank_variants
from edgefleet.compose import prepare_candidate, rollout_spec
from edgefleet.modelcli import Commands
from edgefleet.specargs import add_spec_arguments, rollout_id_of, spec_options
from edgefleet.viewcli import EXIT_FAILED, home_of, watcher
from models.gate import GateReport
from models.report import format_size, text_table
from schemas import Manifest, RejectedError, Release, RolloutSpec, UsageError
from schemas.errors import bound_text

__all__ = ["add_plan_command", "class_offers", "plan_json", "render_plan"]

IDS_SHOWN: Final = 20
"""Device ids a list shows without ``--ids`` (the count says how many in all)."""


def add_plan_command(rollout: Commands[argparse.ArgumentParser]) -> None:
    """``rollout plan``: ``rollout start``'s arguments, and what to show."""
    p = rollout.add_parser(
        "plan", help="dry run of 'rollout start': what each wave would reach; publishes nothing"
    )
    add_spec_arguments(p)
    p.add_argument("--ids", action="store_true", help="list every device id of every wave")
    p.add_argument(
        "--datasets", help="folder of the held-out data sets the classes' accuracy gates name"
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="model file a class runs now, to run its gate against (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(func=_rollout_plan)


def _rollout_plan(args: argparse.Namespace) -> int:
    home = home_of(args)
    rollout_id = rollout_id_of(args)
    options = spec_options(args)
    profiles = load_profiles(Path(args.classes))
    classes = tuple(args.hw_class)
    candidate, files = prepare_candidate(Path(args.model), args.name, profiles, classes)
    now = time.time()
    spec = rollout_spec(rollout_id, classes, candidate, options, issued_at=now)
    baselines = [Path(b).read_bytes() for b in args.baseline]

    async def read() -> tuple[list[DeviceRow], dict[str, Manifest], bool]:
        async with watcher(home) as session:
            rows = await read_fleet(session)
            manifests = await read_manifests(session, classes)
            try:
                taken = await read_status(session, rollout_id) is not None
            except RejectedError:  # something is retained there, even if not a status
                taken = True
        return rows, manifests, taken

    rows, manifests, taken = asyncio.run(read())
    offers = class_offers(
        spec,
        files,
        profiles,
        {name: m.stable for name, m in manifests.items() if m.stable is not None},
        datasets_dir=Path(args.datasets) if args.datasets else None,
        baselines=baselines,
    )
    held = {name: m.rollout.id for name, m in manifests.items() if m.rollout is not None}
    enrolled = {e.device_id: e.hw_class for e in home.enrollments() if not e.revoked}
    plan = make_plan(spec, rows, offers, now=now, held=held, enrolled=enrolled)
    if taken:
        plan = dataclasses.replace(
            plan, refusals=(f"rollout id {rollout_id!r} is taken", *plan.refusals)
        )
    if args.json:
        print(json.dumps(plan_json(plan)))
    else:
        salted = None if args.id else rollout_id
        print("\n".join(render_plan(plan, ids=args.ids, salted_by=salted)))
    return EXIT_FAILED if plan.refusals else 0


# -- the variant and gate of each class, checked here as the coordinator will -------------


def class_offers(
    spec: RolloutSpec,
    files: Sequence[VariantFile],
    profiles: Mapping[str, ClassProfile],
    stables: Mapping[str, Release],
    *,
    datasets_dir: Path | None,
    baselines: Sequence[bytes] = (),
) -> dict[str, ClassOffer]:
    """Class -> the variant it would get: the coordinator's ranking and accuracy gate
    (``coordinator.admission``), run on the local files. ``stables``: the release each
    class runs now (its retained manifest); the gate compares against it, so it runs
    here only when its bytes are among ``baselines`` or the candidate's (blocking)."""
    blobs = {_sha(f.model): f.model for f in files}
    blobs |= {_sha(f.golden): f.golden for f in files if f.golden is not None}
    known = blobs | {_sha(b): b for b in baselines}
    built = [
        Built(v, ModelFacts(blobs[v.artifact.sha256]))
        for v in spec.candidate.variants
        if v.artifact.sha256 in blobs
    ]
    ranking = rank_variants(built, profiles, spec.classes)
    scores = Scores(known)
    offers = {}
    for name in spec.classes:
        offers[name] = _offer(
            spec,
            profiles[name],
            ranking.order[name],
            stable=stables.get(name),
            known=known,
            datasets_dir=datasets_dir,
            scores=scores,
        )
    return offers


def _offer(
    spec: RolloutSpec,
    profile: ClassProfile,
    order: Sequence[Built],
    *,
    stable: Release | None,
    known: Mapping[str, bytes],
    datasets_dir: Path | None,
    scores: Scores,
) -> ClassOffer:
    name = profile.name
    if not order:
        return ClassOffer(hw_class=name, variant=None, refusal=f"{name}: no variant fits")
    gate = profile.gate
    if gate is None:
        return _offered(spec, profile, order[0], "no accuracy gate")
    wanted = ", ".join(b.variant.label for b in order)
    why_not = None
    baseline = None
    if stable is not None:
        sha = stable.artifact.sha256
        if sha in known:
            baseline = (sha, known[sha])
        else:
            why_not = f"the class runs {stable.release_id}: give its model file with --baseline"
    try:
        data = None if why_not else gate_data(datasets_dir, gate.dataset)
    except UsageError as exc:
        why_not = f"{exc} (--datasets)"
        data = None
    if data is None:
        text = f"not run here: {why_not}; the coordinator takes the first of {wanted} that passes"
        if len(order) == 1:  # the one variant goes, or the rollout is refused
            return _offered(spec, profile, order[0], bound_text(text))
        return ClassOffer(hw_class=name, variant=None, gate=bound_text(text))
    chosen, refused, report = first_passing(order, data, baseline, gate, scores)
    refusals = f"; refused {' | '.join(refused)}" if refused else ""
    if chosen is None or report is None:
        why = bound_text(f"{name}: no variant passes the accuracy gate ({' | '.join(refused)})")
        return ClassOffer(hw_class=name, variant=None, gate=bound_text(why), refusal=why)
    return _offered(spec, profile, chosen, bound_text(_measured(report) + refusals))


def _offered(spec: RolloutSpec, profile: ClassProfile, chosen: Built, gate: str) -> ClassOffer:
    v = chosen.variant
    release = Release(
        name=spec.candidate.name,
        variant=v.label,
        artifact=v.artifact,
        golden=v.golden,
        runtime=profile.runtime,
        inputs=v.inputs,
        outputs=v.outputs,
        health=profile.budget(spec.shadow),
    )
    return ClassOffer(
        hw_class=profile.name,
        variant=v.label,
        release=release.release_id,
        sha256=v.artifact.sha256,
        pull_bytes=v.artifact.size + (0 if v.golden is None else v.golden.size),
        gate=gate,
    )


def _measured(report: GateReport) -> str:
    text = f"passed: accuracy {report.candidate.accuracy * 100:.2f}%"
    if report.baseline is not None:
        text += f" vs the stable's {report.baseline.accuracy * 100:.2f}%"
    if report.agreement is not None:
        text += f", agreement {report.agreement * 100:.1f}%"
    return f"{text} on {report.samples} held-out samples"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- showing a plan ------------------------------------------------------------------------


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON document; each wave with its totals."""
    document = dataclasses.asdict(plan)
    for wave, shown in zip(plan.waves, document["waves"], strict=True):
        shown |= {"new": wave.new, "offline": wave.offline, "pull_bytes": wave.pull_bytes}
    return document


def render_plan(plan: Plan, *, ids: bool, salted_by: str | None = None) -> list[str]:
    """The plan for people; ``salted_by``: the generated rollout id the buckets used."""
    lines = [f"rollout plan {plan.rollout_id} for {', '.join(plan.classes)} (nothing published)"]
    if salted_by is not None:
        lines.append(
            f"buckets are salted with the rollout id: start with --id {salted_by} for this plan"
        )
    lines += ["", "variants:"]
    lines += [
        f"  {o.hw_class}: {o.release or o.variant or 'undecided'}"
        + ("" if o.pull_bytes is None else f", {format_size(o.pull_bytes)} a device")
        + f"; gate: {o.gate}"
        for o in plan.offers
    ]
    for wave in plan.waves:
        lines += ["", *_wave_lines(wave, len(plan.waves), ids=ids)]
    lines += _tail(plan, ids=ids)
    return lines


def _wave_lines(wave: WavePlan, total: int, *, ids: bool) -> list[str]:
    pulls = "?" if wave.pull_bytes is None else format_size(wave.pull_bytes)
    head = f"wave {wave.index + 1}/{total}, {wave.reach}: reaches {wave.new} more online"
    head += f" and {wave.offline} offline devices; pulls {pulls}"
    rows = [
        (
            c.hw_class,
            str(c.cutoff_bp),
            str(c.reached),
            str(len(c.new)),
            str(len(c.offline)),
            str(c.already),
            _bytes(c),
            "-" if c.paced_minutes is None else f"{c.paced_minutes} min",
        )
        for c in wave.classes
    ]
    header = ("class", "cutoff", "reached", "new", "offline", "has it", "pulls", "paced")
    lines = [head, f"  judged: {_terms(wave.terms)}"]
    lines += ["  " + line for line in text_table(header, rows).splitlines()]
    for c in wave.classes:
        if c.new and ids:
            lines.append(f"  {c.hw_class} new: {_ids(c.new, ids=True)}")
        if c.offline:
            lines.append(f"  {c.hw_class} offline, converge later: {_ids(c.offline, ids=ids)}")
    return lines


def _bytes(c: ClassWave) -> str:
    if c.pull_bytes is None or c.later_bytes is None:
        return "?"
    later = f" (+{format_size(c.later_bytes)} later)" if c.later_bytes else ""
    return format_size(c.pull_bytes) + later


def _terms(terms: WaveTerms) -> str:
    stated = [
        f"{what} {value:g}{unit}"
        for what, value, unit in (
            ("soak at least", terms.min_soak_s, " s"),
            ("promote at healthy share", terms.success_ratio, ""),
            ("roll back above failed share", terms.max_failure_ratio, ""),
            ("silent after", terms.silence_s, " s"),
            ("time out after", terms.timeout_s, " s"),
        )
        if value is not None
    ]
    if not stated:
        return "by the classes' defaults"
    return ", ".join(stated) + ("" if len(stated) == 5 else "; the rest by the classes' defaults")


def _ids(device_ids: Sequence[str], *, ids: bool) -> str:
    if ids or len(device_ids) <= IDS_SHOWN:
        return " ".join(device_ids)
    return " ".join(device_ids[:IDS_SHOWN]) + f" … and {len(device_ids) - IDS_SHOWN} more"


def _tail(plan: Plan, *, ids: bool) -> list[str]:
    lines = []
    if plan.canaries:
        lines.append(f"canaries (first wave): {_ids(plan.canaries, ids=True)}")
    if plan.unknown_canaries:
        unknown = _ids(plan.unknown_canaries, ids=ids)
        lines.append(f"canaries no device of these classes reports as: {unknown}")
    offline = sum(w.offline for w in plan.waves)
    if offline:
        lines.append(
            f"{offline} offline devices are not waited for: they converge from the retained "
            "manifest when they come back"
        )
    if plan.unclassified:
        lines.append(f"no state reported (in no wave yet): {_ids(plan.unclassified, ids=ids)}")
    for name, never in plan.never_seen.items():
        lines.append(f"{name}: enrolled, never reported: {_ids(never, ids=ids)}")
    lines += [f"note: {note}" for note in plan.notes]
    if plan.refusals:
        lines.append("the coordinator would refuse this rollout:")
        lines += [f"  {refusal}" for refusal in plan.refusals]
    return ["", *lines] if lines else []
