"""Per-layer sensitivity profiles: Wanda, gradient importance, block influence, z-scored.

Entry point: :func:`profile_model`. Record: :class:`SensitivityProfile` (JSON, schema-versioned).
"""

from agent_prune.sensitivity.profile import model_fingerprint, profile_model
from agent_prune.sensitivity.schema import (
    LayerProfile,
    ModuleStats,
    ProtectedItem,
    SensitivityProfile,
    Structures,
    SuperWeight,
)
from agent_prune.sensitivity.streaming import ActivationStore

__all__ = [
    "ActivationStore",
    "LayerProfile",
    "ModuleStats",
    "ProtectedItem",
    "SensitivityProfile",
    "Structures",
    "SuperWeight",
    "model_fingerprint",
    "profile_model",
]
