"""Per-node wall time and peak memory in the trace, and the breakdown read from it."""

from agent_prune.agent.meter import Meter, rss_bytes, status_kib
from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from agent_prune.reporting.cost import breakdown_markdown, candidate_rows, iteration_rows, node_rows
from tests.agent.loop_fixtures import tiny_run_options

MIB = 1024 * 1024


def test_status_fields_are_read_in_kib():
    text = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    assert status_kib("VmHWM", text) == 204800 and status_kib("VmRSS", text) == 102400
    assert status_kib("VmSwap", text) is None


def test_a_nested_measurement_hands_its_peak_to_the_enclosing_one():
    before = rss_bytes()[0]
    with Meter() as outer, Meter() as inner:
        block = bytearray(64 * MIB)
        block[::4096] = b"\1" * len(block[::4096])  # touch every page so it is resident
        del block
    assert inner.peak >= before + 60 * MIB
    assert outer.peak >= inner.peak  # the inner reset of the high-water mark does not hide it


def test_every_node_run_is_measured_and_the_breakdown_adds_up(tmp_path):
    options = tiny_run_options(tmp_path, final_eval={"speed": False})
    summary = start_run(options)
    records = read_trace(tmp_path / "run" / "trace.jsonl")
    nodes = [r for r in records if r["event"] == "node"]
    assert next(r["node"] for r in nodes) == "start" and nodes[-1]["node"] == "finish"
    assert all(r["peak_rss_mb"] > 0 and r["duration_s"] >= 0 for r in nodes)
    assert {r["node"] for r in nodes} >= {"profile", "plan", "build", "evaluate", "decide"}
    phases = {r["phase"] for r in records if r["event"] == "phase"}
    assert {"load model", "score dense", "export", "final eval dense: wikitext2"} <= phases
    iterations = iteration_rows(records)
    assert [row["iteration"] for row in iterations] == list(range(1, summary["iterations"] + 1))
    assert all(row["accepted"] is not None for row in iterations)
    per_node = node_rows(records)
    assert sum(r["runs"] for r in per_node) == len(nodes)
    candidates = candidate_rows(records)  # each job metered on its own, inside its node's stretch
    assert {r["job"] for r in candidates} == {"build", "score"}
    for job, node in (("build", "build"), ("score", "evaluate")):
        node_peak = max(r["peak_rss_mb"] for r in nodes if r["node"] == node)
        assert all(0 < r["peak_rss_mb"] <= node_peak for r in candidates if r["job"] == job)
    table = breakdown_markdown(records)
    assert "| evaluate |" in table and "final eval step-" in table and "| score |" in table


def test_cpu_time_and_page_faults_are_the_stretchs_own():
    with Meter() as idle:
        pass
    with Meter() as busy:
        block = bytearray(64 * MIB)
        block[::4096] = b"\1" * len(block[::4096])  # first touch of every page: a minor fault each
        del block
    assert busy.minor_faults >= 64 * MIB // (2 * MIB)  # one a page: at least one per 2 MiB huge page
    assert idle.minor_faults < busy.minor_faults
    figures = busy.figures()
    assert {"cpu_user_s", "cpu_sys_s"} <= figures.keys()
    assert figures["minor_faults"] == busy.minor_faults
