"""The cloud side of edgefleet, and the operator's commands."""

from coordinator.config import CoordinatorConfig, CoordinatorLimits
from coordinator.profiles import DEFAULT_PROFILES, ClassProfile, load_profiles
from coordinator.rollout import Action, RolloutRecord, step
from coordinator.service import Coordinator, serve
from coordinator.store import StoreDamagedError

__all__ = [
    "DEFAULT_PROFILES",
    "Action",
    "ClassProfile",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorLimits",
    "RolloutRecord",
    "StoreDamagedError",
    "load_profiles",
    "serve",
    "step",
]
