"""The device side of edgefleet: verify, fetch, serve, soak, report."""

from agent.bundle import BUNDLE_FILE, Bundle
from agent.lifecycle import Stage, Step
from agent.outbox import Outbox
from agent.runtime import Feed, ModelSlot
from agent.service import Agent, AgentConfig, InputSource

__all__ = [
    "BUNDLE_FILE",
    "Agent",
    "AgentConfig",
    "Bundle",
    "Feed",
    "InputSource",
    "ModelSlot",
    "Outbox",
    "Stage",
    "Step",
]
