"""Per-layer sensitivity profiles: Wanda, gradient importance, block influence, z-scored.

Entry point: :func:`profile_model`. Record: :class:`SensitivityProfile` (JSON, schema-versioned).
"""

from agent_prune.sensitivity.activations import ActivationStore
from agent_prune.sensitivity.fingerprints import layer_fingerprint, model_fingerprint
from agent_prune.sensitivity.profile import profile_model
from agent_prune.sensitivity.schema import (
    LayerProfile,
    ModuleStats,
    ProtectedItem,
    SensitivityProfile,
    Structures,
    SuperWeight,
)

__all__ = [
    "ActivationStore",
    "LayerProfile",
    "ModuleStats",
    "ProtectedItem",
    "SensitivityProfile",
    "Structures",
    "SuperWeight",
    "layer_fingerprint",
    "model_fingerprint",
    "profile_model",
]
