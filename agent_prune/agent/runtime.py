"""What a run holds outside the graph state, split by concern; the graph's nodes reach each piece by
name, and each piece imports only the packages its concern needs:

- the resources every piece shares (``resources.RunResources``, this class's base): options,
  trace, reporter, and the base model, data folder, planner and calibration windows, built on first
  use; ``profiling`` reads profiles and layer sizes off a state with them;
- ``scoring`` (``scoring.Scoring``): the loop's signals, the report's tasks, and the dense model's
  figures through the evaluation cache;
- ``states`` (``states.ModelStates``): the checkpoint store and the replayed models kept in memory;
- ``builder`` (``building.CandidateBuilder``): candidates built and recovered, accepted steps healed;
- ``steps`` (``steps.Steps``): step 0, a state's scores, and accepting a candidate as a step;
- ``final`` (``final.FinalReport``): the export and the report's dense vs pruned measurements;
- ``workers`` (``workers.CandidateWorkers``): where a step's candidates are built and scored (the
  run's own process, or worker processes with ``--workers N``).
"""

from __future__ import annotations

from agent_prune.agent.building import CandidateBuilder
from agent_prune.agent.final import FinalReport
from agent_prune.agent.options import RunOptions
from agent_prune.agent.reporter import Reporter
from agent_prune.agent.resources import RunResources
from agent_prune.agent.scoring import Scoring
from agent_prune.agent.states import ModelStates
from agent_prune.agent.steps import Steps
from agent_prune.agent.workers import CandidateWorkers


class RunContext(RunResources):
    def __init__(self, options: RunOptions, reporter: Reporter | None = None):
        super().__init__(options, reporter)
        self.scoring = Scoring(self)
        self.states = ModelStates(self)
        self.builder = CandidateBuilder(self)
        self.steps = Steps(self, self.scoring, self.states, self.builder)
        self.final = FinalReport(self, self.scoring, self.states)
        self.workers = CandidateWorkers(self)
