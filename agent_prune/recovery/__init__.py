"""Recovery after structural cuts: local reconstruction (closed-form refits) and distillation healing."""

from agent_prune.recovery.heal import HealReport, HealSettings, heal, mean_kl
from agent_prune.recovery.reconstruct import LayerRefit, ReconstructionReport, reconstruct

__all__ = [
    "HealReport", "HealSettings", "LayerRefit", "ReconstructionReport", "heal", "mean_kl", "reconstruct",
]
