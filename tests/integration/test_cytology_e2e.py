"""The second task on its own hardware class: medical carts run the cytology model on
their analysers' readings (real held-out fine-needle aspirate measurements), gated on
the cytology data set; a digits model sent to the carts is refused by that gate."""

from __future__ import annotations

from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import Phase
from tests.integration.fleetkit import MakeFleet, Wire, eventually, live, release_id, roll_out, run

CART = "medical-cart-cpu"

CART_PROFILE = """
[classes.medical-cart-cpu]
providers = ["CPUExecutionProvider"]
precisions = ["fp32"]
max_model_bytes = 50_000_000
gate = { dataset = "cytology", max_drop_points = 0.5, min_accuracy = 0.95 }
health = { max_error_rate = 0.0, p95_latency_ms = 50.0, min_inferences = 20, soak_seconds = 1.0 }
"""


def test_carts_serve_the_cytology_model_and_refuse_a_digits_model(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({CART: 2})
    path = fleet.workdir / "carts.toml"
    path.write_text(CART_PROFILE, encoding="utf-8")
    fleet.profiles = path
    fleet.sources = {CART: "cytology"}
    fleet.datasets_dir = demo_models["cytology-v1"].dataset.parent
    run(_carts(fleet, demo_models))


async def _carts(fleet: Fleet, demo_models: dict[str, DemoModel]) -> None:
    cytology = demo_models["cytology-v1"]
    async with live(fleet), Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, cytology, rollout_id="carts-v1")
        agents = list(fleet.agents.values())
        assert all(a.active_release is not None for a in agents)
        assert {a.active_release.release_id for a in agents if a.active_release} == {
            release_id(cytology)
        }
        # They keep inferring on the cytology readings without errors.
        counts = {a.device_id: a.inferences_total for a in agents}

        async def inferred() -> bool:
            return all(a.inferences_total > counts[a.device_id] + 20 for a in agents)

        await eventually(inferred, what="the carts to keep inferring")
        assert all(a.inference_errors == 0 for a in agents)

        refused = await roll_out(
            operator,
            fleet,
            wire,
            demo_models["digits-v2"],
            rollout_id="digits-on-carts",
            expect=Phase.REJECTED,
        )
        assert refused.reason is not None
        assert refused.reason.startswith(f"{CART}: no variant passes the accuracy gate")
        assert "does not fit input 'pixels'" in refused.reason
        assert {a.active_release.release_id for a in agents if a.active_release} == {
            release_id(cytology)
        }
