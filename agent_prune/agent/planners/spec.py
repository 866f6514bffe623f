"""The ``--planner`` spec: one syntax for the CLI, config files and the Python API."""

from __future__ import annotations

from agent_prune.agent.planners.base import Planner
from agent_prune.agent.planners.heuristic import HeuristicPlanner
from agent_prune.errors import InputError


def make_planner(spec: str, **options) -> Planner:
    """Build the planner named by ``spec`` (``heuristic`` for now; LLM kinds come next)."""
    if spec == "heuristic":
        return HeuristicPlanner()
    raise InputError(f"unknown planner '{spec}'", "use --planner heuristic")
