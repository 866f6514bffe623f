"""When recovery runs inside the pruning loop (``--recovery none|reconstruct|distill``).

As in MoP (arXiv 2602.06127), cheap recovery is part of each candidate: with ``reconstruct`` or
``distill``, every candidate is reconstructed before the candidates are compared. Healing is
expensive, so with ``distill`` it runs once a candidate is accepted (or when the planner asks for a
heal step), bounded by its own token and wall-clock budget.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from agent_prune.recovery.heal import HealSettings

RecoveryMode = Literal["none", "reconstruct", "distill"]


class RecoveryPolicy(BaseModel):
    mode: RecoveryMode = "none"
    reconstruct_windows: int = Field(default=64, gt=0, description="C4 windows per reconstruction")
    ridge: float = Field(default=1e-3, gt=0)
    heal: HealSettings = Field(default_factory=lambda: HealSettings(max_tokens=100_000, max_seconds=600))

    @property
    def reconstructs_candidates(self) -> bool:
        return self.mode in ("reconstruct", "distill")

    @property
    def heals_after_accept(self) -> bool:
        return self.mode == "distill"
