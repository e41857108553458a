"""The device side of edgefleet: verify, fetch, serve, soak, report."""

from agent.bundle import BUNDLE_FILE, Bundle
from agent.engine import UpdateEngine
from agent.inference import InputSource
from agent.lifecycle import Stage, Step
from agent.limits import Limits
from agent.outbox import Outbox
from agent.runtime import Feed, ModelSlot
from agent.service import Agent, AgentConfig

__all__ = [
    "BUNDLE_FILE",
    "Agent",
    "AgentConfig",
    "Bundle",
    "Feed",
    "InputSource",
    "Limits",
    "ModelSlot",
    "Outbox",
    "Stage",
    "Step",
    "UpdateEngine",
]
