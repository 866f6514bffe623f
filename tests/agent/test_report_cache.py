"""The report's dense figures are measured once per model and protocol; the tasks are the user's."""

import json

from agent_prune.agent.scoring import Scoring
from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from tests.agent.loop_fixtures import tiny_run_options


def count_report_tasks(monkeypatch) -> list[tuple[int, str]]:
    """Calls of ``Scoring.report_task`` (the seam that runs the test protocol) as (model id, task)."""
    calls: list[tuple[int, str]] = []
    real = Scoring.report_task

    def counted(self, model, task):
        calls.append((id(model) == id(self.resources.base.model), task))
        return real(self, model, task)

    monkeypatch.setattr(Scoring, "report_task", counted)
    return calls


def test_a_second_run_of_the_same_model_and_protocol_reads_the_dense_figures(tmp_path, monkeypatch):
    calls = count_report_tasks(monkeypatch)
    first = start_run(tiny_run_options(tmp_path, final_eval={"speed": False}))
    tasks = ["wikitext2", "freebaseqa", "arc_easy"]
    assert [task for dense, task in calls if dense] == tasks
    calls.clear()
    second = start_run(tiny_run_options(tmp_path, out=str(tmp_path / "run2"), final_eval={"speed": False}))
    assert [task for dense, task in calls if dense] == []  # no dense evaluation the second time
    assert [task for dense, task in calls if not dense] == tasks  # the pruned model still is
    report = (tmp_path / "run2" / "report.md").read_text()
    assert "evaluation cache" in report and "Evaluated in float32." in report
    dense_scoring = [[r["cached"] for r in read_trace(tmp_path / run / "trace.jsonl")
                      if r.get("phase") == "score dense"] for run in ("run", "run2")]
    assert dense_scoring == [[False], [True]]  # the in-loop dense scores are cached too
    signals = [json.loads((tmp_path / run / "checkpoints" / "step-0000" / "signals.json").read_text())
               for run in ("run", "run2")]
    assert signals[0] == signals[1]
    assert dense_profile_cached(tmp_path / "run") == [False]  # so is the dense model's profile
    assert dense_profile_cached(tmp_path / "run2") == [True]
    profiles = [(tmp_path / run / "profiles" / "step-0000.json").read_text() for run in ("run", "run2")]
    assert profiles[0] == profiles[1]
    before, after = first["final"]["evaluation"]["dense"], second["final"]["evaluation"]["dense"]
    for task in tasks:
        assert "cache" not in before[task] and after[task]["cache"]["key"]
        assert {k: v for k, v in after[task].items() if k != "cache"} == before[task]
    calls.clear()
    start_run(tiny_run_options(tmp_path, out=str(tmp_path / "run3"), final_eval={"speed": False,
                                                                                 "freebaseqa_limit": 4}))
    assert [task for dense, task in calls if dense] == ["freebaseqa"]  # another protocol, measured
    assert dense_profile_cached(tmp_path / "run3") == [True]  # the calibration did not change
    start_run(tiny_run_options(tmp_path, out=str(tmp_path / "run4"), calib_samples=3,
                               final_eval={"speed": False, "tasks": ["arc_easy"]}))
    assert dense_profile_cached(tmp_path / "run4") == [False]  # another calibration, profiled again


def dense_profile_cached(run_dir) -> list[bool]:
    """Whether each profile of the dense model (step 0) in a run came from the cache."""
    return [r["cached"] for r in read_trace(run_dir / "trace.jsonl")
            if r.get("event") == "profile" and r["step"] == 0]


def test_the_report_measures_only_the_chosen_tasks(tmp_path, monkeypatch):
    calls = count_report_tasks(monkeypatch)
    summary = start_run(tiny_run_options(tmp_path, final_eval={"tasks": ["arc_easy"], "speed": False}))
    assert sorted(task for _, task in calls) == ["arc_easy", "arc_easy"]
    assert set(summary["final"]["evaluation"]["pruned"]) == {"arc_easy"}
    assert "speed" not in summary["final"]
