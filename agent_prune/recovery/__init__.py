"""Recovery after structural cuts: local reconstruction (closed-form refits) and distillation healing."""

from agent_prune.recovery.heal import HealReport, HealSettings, heal, mean_kl
from agent_prune.recovery.policy import RecoveryMode, RecoveryPolicy
from agent_prune.recovery.reconstruct import LayerRefit, ReconstructionReport, reconstruct

__all__ = [
    "HealReport", "HealSettings", "LayerRefit", "ReconstructionReport", "RecoveryMode", "RecoveryPolicy",
    "heal", "mean_kl", "reconstruct",
]
