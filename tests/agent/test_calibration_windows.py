"""Calibration windows have their own length: the profile and the refit read calib_seqlen-token
windows, the evaluation windows keep seqlen, and the dense profile's cache knows the difference."""

from agent_prune.agent.resources import RunResources
from agent_prune.agent.session import RUN_FILE, read_run_options, start_run
from agent_prune.agent.trace import read_trace
from agent_prune.io import atomic_write_json, read_json
from agent_prune.models.streaming import windows_per_batch
from tests.agent.loop_fixtures import tiny_run_options
from tests.agent.test_report_cache import dense_profile_cached


def test_calibration_windows_take_calib_seqlen_and_batches_keep_their_tokens(tmp_path):
    resources = RunResources(tiny_run_options(tmp_path, calib_samples=6, calib_seqlen=16))
    assert tuple(resources.calibration.shape) == (6, 16)
    assert windows_per_batch(4096, resources.options.calib_seqlen) == 256
    assert windows_per_batch(8, resources.options.calib_seqlen) == 1  # never an empty batch


def test_a_run_profiles_and_refits_on_short_windows_and_evaluates_on_long_ones(tmp_path):
    options = dict(recovery="reconstruct", branches=["width"], final_eval={"windows": 0})
    summary = start_run(tiny_run_options(tmp_path, calib_seqlen=16, calib_samples=6, **options))
    assert summary["accepted_steps"] >= 2, summary
    run = tmp_path / "run"
    profiles = [read_json(r["path"]) for r in read_trace(run / "trace.jsonl") if r["event"] == "profile"]
    assert {(p["calibration"]["samples"], p["calibration"]["seqlen"]) for p in profiles} == {(6, 16)}
    assert any(p["cost"]["measured_in"] == "reconstruction" for p in profiles)  # the refit walk's too
    assert read_json(run / "run.json")["options"]["seqlen"] == 32
    # the same windows' count at another length is another calibration: profiled again
    start_run(tiny_run_options(tmp_path, out=str(tmp_path / "run2"), calib_seqlen=24, calib_samples=6,
                               **options))
    assert dense_profile_cached(tmp_path / "run2") == [False]
    start_run(tiny_run_options(tmp_path, out=str(tmp_path / "run3"), calib_seqlen=16, calib_samples=6,
                               **options))
    assert dense_profile_cached(tmp_path / "run3") == [True]


def test_a_run_from_before_calib_seqlen_resumes_on_its_own_windows(tmp_path):
    """run.json of an older run has no calib_seqlen: its calibration windows were seqlen long."""
    options = tiny_run_options(tmp_path).model_dump(mode="json")
    del options["calib_seqlen"]
    (tmp_path / "old").mkdir()
    atomic_write_json(tmp_path / "old" / RUN_FILE, {"options": options})
    assert read_run_options(tmp_path / "old").calib_seqlen == options["seqlen"] == 32
