"""Candidates built and scored in worker processes (--workers 2) give the run of one process."""

import hashlib
import json
from pathlib import Path

import pytest

from agent_prune.agent.runtime import RunContext
from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from agent_prune.agent.workers import WorkerDied, WorkerTraceback
from tests.agent.loop_fixtures import tiny_run_options

# wall-clock and resource figures (each process meters its own): the only fields allowed to differ
TIMINGS = {"ts", "duration_s", "seconds", "peak_rss_mb", "peak_scope", "rss_mb", "cuda_peak_mb", "cpu_user_s",
           "cpu_sys_s", "minor_faults"}


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def loop_record(run: Path) -> dict:
    """What a run decided and measured, without wall-clock times or its own directory's name."""
    events = [untimed(r) for r in read_trace(run / "trace.jsonl")
              if r["event"] in ("candidate_built", "candidate_invalid", "candidate_scored", "decision")]
    signals = {str(p.relative_to(run)): untimed(json.loads(p.read_text()))
               for p in sorted(run.glob("candidates/*/*/signals.json"))}
    weights = hashlib.sha256((run / "model" / "model.safetensors").read_bytes()).hexdigest()
    return json.loads(json.dumps({"events": events, "signals": signals, "weights": weights})
                      .replace(str(run), "RUN"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run with one worker and with two (same model and data folders)."""
    tmp = tmp_path_factory.mktemp("workers")
    summaries = {}
    for workers in (1, 2):
        options = tiny_run_options(tmp, out=str(tmp / f"run-{workers}"), workers=workers,
                                   target_sparsity=0.45, final_eval={"windows": 0, "speed": False})
        summaries[workers] = start_run(options)
    return tmp, summaries


def test_two_workers_decide_and_export_what_one_does(runs):
    tmp, summaries = runs
    one, two = loop_record(tmp / "run-1"), loop_record(tmp / "run-2")
    assert [e["event"] for e in one["events"]].count("decision") >= 2  # more than one step to agree on
    assert one == two
    assert untimed(summaries[1]["steps"]) == untimed(summaries[2]["steps"])
    assert summaries[1]["status"] == summaries[2]["status"] == "target_reached"


def test_worker_failures_surface_as_in_the_run_process(runs):
    tmp, _ = runs
    run = tmp / "run-1"
    dense = str(run / "checkpoints" / "step-0000")
    job = {"current": dense, "profile": str(run / "profiles" / "step-0000.json"), "pruner": "l2",
           "actions": [{"kind": "remove_layers", "layers": [99]}]}
    options = tiny_run_options(tmp, out=str(tmp / "scratch"), workers=2)
    inline, pooled = RunContext(options.model_copy(update={"workers": 1})), RunContext(options)
    try:
        # A candidate whose actions do not apply is recorded as invalid, with the same message.
        invalid = [{**job, "target": str(tmp / "scratch" / name)} for name in ("a", "b")]
        [(expected, _), _] = list(inline.workers.run("build", invalid))
        assert expected["invalid"].startswith("remove_layers: layer 99 does not exist")
        assert [info for info, _ in pooled.workers.run("build", invalid)] == [expected, expected]
        # Any other error is raised in the run's process, with the worker's traceback as its cause.
        with pytest.raises(FileNotFoundError) as raised:
            pooled.workers.run("score", [{"candidate": str(tmp / "no-such-candidate")}])
        assert isinstance(raised.value.__cause__, WorkerTraceback)
        assert "score_candidate" in str(raised.value.__cause__)
        # A worker that dies (here killed as the job is handed to it) is an error, and stops the pool.
        processes = pooled.workers.pool.processes
        with pytest.raises(WorkerDied, match="died during a score job"):
            pooled.workers.run("score", [{"candidate": dense}],
                               started=lambda index: processes[index].kill())
        assert pooled.workers.pool is None and not any(p.is_alive() for p in processes)
    finally:
        pooled.workers.close()


def test_the_flags_give_each_worker_a_device_of_the_run_s_kind():
    from agent_prune.cli import build_parser
    from agent_prune.commands.run import options_from_args
    from agent_prune.errors import InputError

    def options(*extra: str):
        base = ["run", "--model", "m", "--out", "o", "--target-sparsity", "0.2"]
        return options_from_args(build_parser().parse_args([*base, *extra]))

    assert (options().workers, options().worker_devices, options().candidate_threads) == (1, None, None)
    parsed = options("--device", "cuda", "--workers", "2", "--worker-devices", "cuda:0, cuda:1",
                     "--candidate-threads", "1")
    assert (parsed.workers, parsed.worker_devices, parsed.candidate_threads) == (2, ["cuda:0", "cuda:1"], 1)
    with pytest.raises(InputError, match="1 worker devices for 2 workers"):
        options("--workers", "2", "--worker-devices", "cpu")
    with pytest.raises(InputError, match="not all of the run's device kind"):
        options("--workers", "2", "--worker-devices", "cpu,cuda:0")
