"""The inference path on its own: real models in onnxruntime behind
:class:`agent.inference.Inference`, what it counts checked against onnxruntime run directly.

A model not yet measured runs in the worker thread; once measured, jobs that fit
``inline_ms`` run inline on the loop, batched with the callers ready at that moment. Either
way every caller gets its own rows' answer and every inference is counted once, a batch in
one update of the telemetry window and the soak."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest

from agent.events import EngineEvent, Inferred
from agent.inference import Inference, InferenceFailedError, Prediction
from agent.limits import Limits
from agent.runtime import ModelSlot, Tally
from models import INPUT_NAME, DemoModel, DigitsSplit
from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from schemas import ShadowBudget
from tests.agent.conftest import release_of

GUARD_S = 30.0
ALWAYS_INLINE = Limits(inline_ms=1e9)
NEVER_INLINE = Limits(inline_ms=0.0)


@dataclass
class Counted:
    """What an :class:`Inference` told the telemetry window and the engine."""

    tallies: list[Tally] = field(default_factory=list)
    events: list[EngineEvent] = field(default_factory=list)

    def answered(self) -> int:
        return sum(t.answered for t in self.tallies)

    def labels(self) -> Counter[int]:
        return sum((t.labels for t in self.tallies), Counter[int]())

    def calls(self) -> list[tuple[float, int]]:
        """Every model call the engine was told of: ``(latency, answers)``."""
        return [run for e in self.events if isinstance(e, Inferred) for run in e.runs]


@asynccontextmanager
async def serving(slot: ModelSlot, limits: Limits) -> AsyncIterator[tuple[Inference, Counted]]:
    """An inference path serving ``slot``, its worker running."""
    counted = Counted()
    inference = Inference(
        None,
        device_id="dev-0001",
        hz=20.0,
        record=counted.tallies.append,
        feed=counted.events.append,
        clock=lambda: 1.0,
        limits=limits,
    )
    inference.slot = slot
    async with asyncio.timeout(GUARD_S), asyncio.TaskGroup() as tg:
        task = tg.create_task(inference.run())
        await inference.until_ready()
        yield inference, counted
        task.cancel()


def rows(split: DigitsSplit, n: int) -> np.ndarray:
    return np.ascontiguousarray(split.x_holdout[:n], dtype=np.float32)


def direct(slot: ModelSlot, x: np.ndarray) -> dict[str, np.ndarray]:
    """The model's own answer, row by row as a batch: onnxruntime without the path."""
    return slot.timed({INPUT_NAME: x})[0]


def slot_of(model: DemoModel) -> ModelSlot:
    return ModelSlot(release_of(model), model.path)


@pytest.mark.parametrize(
    ("limits", "inline_turns"),
    [(ALWAYS_INLINE, True), (NEVER_INLINE, False)],
    ids=["inline", "worker"],
)
def test_concurrent_callers_each_get_their_rows_answer_and_each_is_counted_once(
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
    limits: Limits,
    inline_turns: bool,
) -> None:
    """Callers of one row and of several at once: the answers are onnxruntime's for their
    own rows, and telemetry and the engine count one inference per call (its first row's
    label), whichever side of the thread the batches ran on."""
    slot = slot_of(demo_models["digits-v1"])
    x = rows(digits_split, 120)
    expected = direct(slot, x)
    spans = [(i, i + 1 + i % 3) for i in range(0, 117, 3)]

    async def scenario() -> None:
        async with serving(slot, limits) as (inference, counted):
            first = await inference.infer({INPUT_NAME: x[:1]})  # measures the model
            assert inference.turns == {"inline": 0, "worker": 1}
            answers = await asyncio.gather(
                *(inference.infer({INPUT_NAME: x[a:b]}) for a, b in spans)
            )
        for (a, b), answer in zip(spans, answers, strict=True):
            assert answer.release_id == slot.release_id
            assert answer.outputs[LABEL_OUTPUT].tolist() == expected[LABEL_OUTPUT][a:b].tolist()
            assert np.allclose(
                answer.outputs[PROBABILITIES_OUTPUT], expected[PROBABILITIES_OUTPUT][a:b], rtol=1e-5
            )
        calls = 1 + len(spans)
        assert inference.total == counted.answered() == calls
        assert sum(n for _, n in counted.calls()) == calls
        firsts = [int(expected[LABEL_OUTPUT][a]) for a, _ in spans]
        assert counted.labels() == Counter([int(first.outputs[LABEL_OUTPUT][0]), *firsts])
        assert len(counted.calls()) < calls, "batched"
        assert (inference.turns["inline"] > 0) is inline_turns

    asyncio.run(scenario())


def test_a_model_not_yet_measured_runs_in_the_worker_then_inline_in_batches_of_max_batch(
    demo_models: dict[str, DemoModel], digits_split: DigitsSplit
) -> None:
    slot = slot_of(demo_models["digits-v1"])
    x = rows(digits_split, 40)

    async def scenario() -> None:
        async with serving(slot, Limits(inline_ms=1e9, max_batch=8)) as (inference, counted):
            assert slot.row_ms is None
            await inference.infer({INPUT_NAME: x[:1]})
            assert slot.row_ms is not None
            await asyncio.gather(*(inference.infer({INPUT_NAME: x[i : i + 1]}) for i in range(40)))
        assert inference.turns == {"inline": 1, "worker": 1}
        assert [n for _, n in counted.calls()] == [1, 8, 8, 8, 8, 8]

    asyncio.run(scenario())


@pytest.mark.parametrize("limits", [ALWAYS_INLINE, NEVER_INLINE], ids=["inline", "worker"])
def test_a_poisoned_input_fails_its_own_call_only_and_counts_as_one_error(
    demo_models: dict[str, DemoModel], digits_split: DigitsSplit, limits: Limits
) -> None:
    slot = slot_of(demo_models["digits-v1"])
    x = rows(digits_split, 30)
    poisoned = x[:2].copy()
    poisoned[1, 5] = np.nan  # not its first row: found all the same

    async def scenario() -> None:
        async with serving(slot, limits) as (inference, counted):
            await inference.infer({INPUT_NAME: x[:1]})
            feeds = [x[i : i + 1] for i in range(30)]
            feeds.insert(11, poisoned)
            outcomes = await asyncio.gather(
                *(inference.infer({INPUT_NAME: f}) for f in feeds), return_exceptions=True
            )
        failed = outcomes.pop(11)
        assert isinstance(failed, InferenceFailedError)
        assert "non-finite" in str(failed)
        good = [p for p in outcomes if isinstance(p, Prediction)]
        labels = [int(p.outputs[LABEL_OUTPUT][0]) for p in good]
        assert labels == direct(slot, x)[LABEL_OUTPUT].tolist()
        assert (inference.total, inference.errors) == (32, 1)
        assert sum(t.errors for t in counted.tallies) == 1
        assert sum(e.errors for e in counted.events if isinstance(e, Inferred)) == 1

    asyncio.run(scenario())


def test_an_inline_caller_that_gives_up_before_its_batch_ran_is_not_counted(
    demo_models: dict[str, DemoModel], digits_split: DigitsSplit
) -> None:
    """The first caller back would run the batch; cancelled first, it leaves, and the
    next one runs the others' jobs (asyncio runs ready tasks in order)."""
    slot = slot_of(demo_models["digits-v1"])
    x = rows(digits_split, 10)

    async def scenario() -> None:
        async with serving(slot, ALWAYS_INLINE) as (inference, counted):
            await inference.infer({INPUT_NAME: x[:1]})
            callers = [
                asyncio.create_task(inference.infer({INPUT_NAME: x[i : i + 1]})) for i in range(10)
            ]
            await asyncio.sleep(0)  # each caller has queued its job and yielded
            callers[0].cancel()
            outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert all(isinstance(p, Prediction) for p in outcomes[1:])
        assert inference.total == counted.answered() == 1 + 9
        assert inference.turns["inline"] == 1

    asyncio.run(scenario())


def test_a_shadow_runs_on_the_same_jobs_in_the_worker_and_counts_only_for_its_soak(
    demo_models: dict[str, DemoModel], digits_split: DigitsSplit
) -> None:
    """Beside the serving model, the candidate runs on every job (in the worker, after
    the serving model, on the same batch); callers get the serving model's answers,
    telemetry counts those alone, and the engine hears how many of the candidate's
    agreed. Serving a model again ends the shadow."""
    slot = slot_of(demo_models["digits-v1"])
    v2 = release_of(demo_models["digits-v2"])
    budget = v2.health.model_copy(update={"shadow": ShadowBudget(min_agreement=0.5)})
    beside = ModelSlot(v2.model_copy(update={"health": budget}), demo_models["digits-v2"].path)
    x = rows(digits_split, 30)
    served, theirs = direct(slot, x)[LABEL_OUTPUT], direct(beside, x)[LABEL_OUTPUT]

    async def scenario() -> None:
        async with serving(slot, ALWAYS_INLINE) as (inference, counted):
            await inference.infer({INPUT_NAME: x[:1]})
            inference.shadow = beside
            answers = await asyncio.gather(
                *(inference.infer({INPUT_NAME: x[i : i + 1]}) for i in range(30))
            )
            assert inference.turns["inline"] == 0
            assert [int(a.outputs[LABEL_OUTPUT][0]) for a in answers] == served.tolist()
            assert {a.release_id for a in answers} == {slot.release_id}
            inference.slot = slot  # served alone again
            assert inference.shadow is None
            await asyncio.gather(*(inference.infer({INPUT_NAME: x[:1]}) for _ in range(3)))
            assert inference.turns["inline"] == 1
        assert inference.total == counted.answered() == 34
        assert {t.sha256 for t in counted.tallies} == {slot.sha256}
        shadows = [e for e in counted.events if isinstance(e, Inferred) and e.compared]
        assert {e.sha256 for e in shadows} == {beside.sha256}
        assert sum(n for e in shadows for _, n in e.runs) == sum(e.compared for e in shadows) == 30
        assert sum(e.agreed for e in shadows) == int((served == theirs).sum())
        assert (served != theirs).any(), "two real models that disagree somewhere"

    asyncio.run(scenario())


def test_a_model_whose_last_call_was_long_goes_to_the_worker_and_back_once_short(
    demo_models: dict[str, DemoModel], digits_split: DigitsSplit
) -> None:
    """The loop is never blocked long: after a call longer than ``inline_ms`` (told here
    as if measured), or with more work in one turn than it, jobs go to the worker."""
    slot = slot_of(demo_models["digits-v1"])
    x = rows(digits_split, 8)

    async def one_turn(inference: Inference, n: int) -> dict[str, int]:
        before = dict(inference.turns)
        await asyncio.gather(*(inference.infer({INPUT_NAME: x[i : i + 1]}) for i in range(n)))
        return {where: inference.turns[where] - before[where] for where in before}

    async def scenario() -> None:
        async with serving(slot, Limits(inline_ms=1.0)) as (inference, _):
            slot.took(5.0, 1)  # a long call
            assert await one_turn(inference, 1) == {"inline": 0, "worker": 1}
            slot.took(0.1, 1)
            assert await one_turn(inference, 1) == {"inline": 1, "worker": 0}
            slot.took(0.3, 1)  # 0.3 ms a row: three fit in one turn, the rest go on
            ran = await one_turn(inference, 8)
            assert ran["inline"] == 1
            assert ran["worker"] >= 1

    asyncio.run(scenario())
