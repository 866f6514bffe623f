"""A run's compute dtype: settled before run.json is written, part of the dense figures' cache key,
and float32 for runs that began before it existed."""

from agent_prune.agent.session import RUN_FILE, read_run_options, start_run
from agent_prune.io import atomic_write_json, read_json
from agent_prune.models.precision import resolve_compute_dtype
from tests.agent.loop_fixtures import tiny_run_options
from tests.agent.test_report_cache import dense_profile_cached

OPTIONS = dict(recovery="reconstruct", branches=["width"], final_eval={"windows": 0}, target_sparsity=0.2)


def test_auto_is_saved_resolved_and_each_compute_dtype_has_its_own_dense_figures(tmp_path):
    assert tiny_run_options(tmp_path).compute_dtype == "float32"  # the default: no autocast
    start_run(tiny_run_options(tmp_path, compute_dtype="auto", **OPTIONS))
    saved = read_json(tmp_path / "run" / RUN_FILE)["options"]["compute_dtype"]
    assert saved == resolve_compute_dtype("auto", "cpu", "float32") != "auto"
    other = "float32" if saved == "bfloat16" else "bfloat16"
    for name, expected in (("run2", [False]), ("run3", [True])):
        options = tiny_run_options(tmp_path, out=str(tmp_path / name), compute_dtype=other, **OPTIONS)
        summary = start_run(options)
        assert summary["accepted_steps"] >= 1, summary
        assert dense_profile_cached(tmp_path / name) == expected  # measured once per compute dtype
    assert read_run_options(tmp_path / "run3").compute_dtype == other


def test_a_run_from_before_compute_dtype_resumes_in_float32(tmp_path):
    options = tiny_run_options(tmp_path).model_dump(mode="json")
    del options["compute_dtype"]
    (tmp_path / "old").mkdir()
    atomic_write_json(tmp_path / "old" / RUN_FILE, {"options": options})
    assert read_run_options(tmp_path / "old").compute_dtype == "float32"


def test_bfloat16_where_it_is_emulated_is_kept_with_a_warning(tmp_path, monkeypatch):
    from agent_prune.agent import session
    from agent_prune.models import precision

    warnings = []
    options = tiny_run_options(tmp_path, compute_dtype="bfloat16")
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: True)
    assert session.settle_compute_dtype(options, warnings.append).compute_dtype == "bfloat16"
    assert warnings == []
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: False)
    assert session.settle_compute_dtype(options, warnings.append).compute_dtype == "bfloat16"
    assert len(warnings) == 1 and "emulates it" in warnings[0] and "--compute-dtype auto" in warnings[0]
    auto = tiny_run_options(tmp_path, compute_dtype="auto")
    assert session.settle_compute_dtype(auto, warnings.append).compute_dtype == "float32"
    assert len(warnings) == 1  # auto never picks an emulated bfloat16
