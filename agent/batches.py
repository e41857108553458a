"""Running jobs through a model in batches: the inference path's work, in whichever
thread it runs (see :mod:`agent.inference`).

Consecutive jobs for the same model run as one call where the model batches (stacked
along the first dimension, at most ``max_rows`` rows, the outputs handed back as views);
a batch that fails, or whose outputs do not have one row per input row, runs again job
by job, so that only the job at fault fails; one whose outputs hold non-finite values
judges each job on its own rows. What ran is summed in :class:`agent.runtime.Tally`, one
per run of jobs of a model. A shadow (:func:`run_beside`) runs the same jobs through the
candidate, and tells how many of its answers agreed with the serving model's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from agent.runtime import Inputs, ModelSlot, Outputs, Tally
from agent.shadow import agrees

__all__ = ["Job", "run_beside", "run_jobs"]


@dataclass(slots=True, eq=False)
class Job:
    """One caller's inference: its feed (checked), and once run its answer or error."""

    slot: ModelSlot
    feed: Inputs
    rows: int
    future: asyncio.Future[None] | None = None
    """Set for a job handed to the worker: done once the job is delivered."""
    shadow: ModelSlot | None = None
    """The candidate that runs beside ``slot`` on this job, if one does."""
    outputs: Outputs | None = None
    error: str | None = None
    ran: bool = False

    def shape_key(self) -> tuple[object, ...]:
        """What must agree for jobs to be stacked into one batch."""
        return tuple((n, a.dtype, a.shape[1:]) for n, a in self.feed.items())


def _stacks(first: Job, job: Job) -> bool:
    slot = first.slot
    return (
        job.slot is slot
        and slot.batchable
        and (slot.uniform or job.shape_key() == first.shape_key())
    )


def _batches(jobs: list[Job], max_rows: int) -> Iterator[list[Job]]:
    """Runs of consecutive jobs that can go through the model as one call."""
    group: list[Job] = []
    rows = 0
    for job in jobs:
        if group and (rows + job.rows > max_rows or not _stacks(group[0], job)):
            yield group
            group, rows = [], 0
        group.append(job)
        rows += job.rows
    if group:
        yield group


def run_jobs(jobs: list[Job], max_rows: int) -> list[Tally]:
    """Run ``jobs`` in batches; what they count, one tally per run of jobs of a release."""
    tallies: list[Tally] = []
    for group in _batches(jobs, max_rows):
        slot = group[0].slot
        if not tallies or tallies[-1].sha256 != slot.sha256:
            tallies.append(slot.tally())
        _run_batch(group, tallies[-1])
    return tallies


def _run_one(job: Job, tally: Tally) -> None:
    job.ran = True
    try:
        outputs, latency_ms = job.slot.timed(job.feed)
    except Exception as exc:  # noqa: BLE001 (any model failure is this job's error)
        job.error = str(exc)
        tally.add(None)
        return
    job.slot.took(latency_ms, job.rows)
    _finish(job, outputs, latency_ms, tally)


def _finish(job: Job, outputs: Outputs, latency_ms: float, tally: Tally) -> None:
    job.ran = True
    try:
        result = ModelSlot.summarise(outputs, latency_ms)
    except ValueError as exc:
        job.error = str(exc)
        tally.add(None)
    else:
        job.outputs = outputs
        tally.add(result)


def _run_batch(group: list[Job], tally: Tally) -> None:
    """Run ``group`` as one call; job by job when the batch fails or its outputs do not
    have one row per input row; each job judged on its own rows when some are not finite."""
    if len(group) == 1:
        _run_one(group[0], tally)
        return
    slot = group[0].slot
    counts = np.fromiter((job.rows for job in group), dtype=np.intp, count=len(group))
    ends = np.cumsum(counts)
    total = int(ends[-1])
    try:
        names = group[0].feed
        outputs, latency_ms = slot.timed(
            {name: np.concatenate([job.feed[name] for job in group]) for name in names}
        )
    except Exception:  # noqa: BLE001 (find the job at fault below)
        outputs, latency_ms = {}, 0.0
    if not outputs or any(a.ndim == 0 or a.shape[0] != total for a in outputs.values()):
        for job in group:
            _run_one(job, tally)
        return
    slot.took(latency_ms, total)
    starts = ends - counts
    spans = zip(group, starts.tolist(), ends.tolist(), strict=True)
    try:
        confidences, labels = ModelSlot.first_rows(outputs, starts)
    except ValueError:  # non-finite values: in whose rows?
        for job, start, end in spans:
            _finish(job, {n: a[start:end] for n, a in outputs.items()}, latency_ms, tally)
        return
    items = list(outputs.items())
    for job, start, end in spans:
        job.outputs = {name: a[start:end] for name, a in items}
        job.ran = True
    tally.add_batch(latency_ms, len(group), confidences, labels)


def run_beside(jobs: list[Job], max_rows: int) -> list[Tally]:
    """Run every job that has a shadow through it, in the same batches, after ``jobs``
    ran; the shadow's tallies, counting how many of its answers agreed with the serving
    model's where both answered."""
    pairs = [(job, Job(job.shadow, job.feed, job.rows)) for job in jobs if job.shadow]
    tallies = run_jobs([beside for _, beside in pairs], max_rows)
    by_model = {tally.sha256: tally for tally in tallies}
    for job, beside in pairs:
        served, shadowed = job.outputs, beside.outputs
        budget = beside.slot.release.health.shadow
        if served is None or shadowed is None or budget is None:
            continue
        tally = by_model[beside.slot.sha256]
        tally.compared += 1
        tally.agreed += agrees(served, shadowed, budget)
    return tallies
