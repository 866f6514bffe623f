"""A run's compute dtype: settled before run.json is written, part of the dense figures' cache key,
what its candidates are scored in (never what it exports), and float32 for runs that began before
it existed."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from agent_prune.agent.runtime import RunContext
from agent_prune.agent.session import RUN_FILE, read_run_options, start_run
from agent_prune.agent.trace import read_trace
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
    # the dense model was scored in each run's own dtype (bfloat16: on a bfloat16 copy) ...
    signals = [read_json(tmp_path / run / "checkpoints" / "step-0000" / "signals.json")["window_nll"]
               for run in ("run", "run2")]
    assert signals[0] != signals[1] and signals[0] == pytest.approx(signals[1], abs=0.02)
    # ... and so is a candidate, from its replay (which the scoring may cast in place) ...
    candidate = next((tmp_path / "run2" / "candidates").glob("iter-*/*/signals.json")).parent
    rescored = {}
    for dtype in ("float32", "bfloat16"):
        copied = tmp_path / f"rescored-{dtype}"
        shutil.copytree(candidate, copied)
        (copied / "signals.json").unlink()
        context = RunContext(read_run_options(tmp_path / "run2").model_copy(update={"compute_dtype": dtype}))
        rescored[dtype] = read_json(context.steps.score_state(copied))["window_nll"]
        assert {p.dtype for p in context.base.model.parameters()} == {torch.float32}  # the base stays
    assert rescored["bfloat16"] != rescored["float32"]
    assert rescored["bfloat16"] == pytest.approx(rescored["float32"], abs=0.02)
    assert read_json(candidate / "signals.json")["window_nll"] == rescored[other]  # as the run scored it
    # ... while the exported weights are float32 in both
    for run in ("run", "run2"):
        with safe_open(str(tmp_path / run / "model" / "model.safetensors"), "pt") as exported:
            names = exported.keys()  # a safe_open handle is not iterable
            assert {exported.get_tensor(name).dtype for name in names} == {torch.float32}


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


def test_a_compute_dtype_report_measures_bfloat16_copies_and_caches_them_apart(tmp_path):
    from agent_prune.evaluation.harness import run_tasks
    from agent_prune.models.loading import load_model
    from agent_prune.models.precision import compute_dtype, evaluated_in

    report = {"tasks": ["wikitext2", "arc_easy"], "speed": False}
    finals = {}
    for name, setting in (("weights", "weights"), ("compute", "compute")):
        options = tiny_run_options(tmp_path, out=str(tmp_path / name), compute_dtype="bfloat16",
                                   recovery="reconstruct", branches=["width"], target_sparsity=0.2,
                                   final_eval={**report, "dtype": setting})
        finals[name] = start_run(options)["final"]["evaluation"]
    for state in ("dense", "pruned"):
        weights, compute = finals["weights"][state], finals["compute"][state]
        assert {e["dtype"] for e in weights.values()} == {"float32"}
        assert {e["dtype"] for e in compute.values()} == {"bfloat16"}
        assert "cache" not in compute["wikitext2"]  # the float32 dense figures were not served
        assert compute["wikitext2"]["nll"] != weights["wikitext2"]["nll"]
        assert compute["wikitext2"]["nll"] == pytest.approx(weights["wikitext2"]["nll"], abs=0.02)
    # the casts are measured stretches of their own (each starts on a trimmed heap); none as stored
    casts = {name: [r["phase"] for r in read_trace(tmp_path / name / "trace.jsonl")
                    if r["event"] == "phase" and r["phase"].endswith(": cast")] for name in finals}
    assert casts == {"weights": [], "compute": ["final eval step-0001: cast", "final eval dense: cast"]}
    # the pruned figures are the exported model's on a bfloat16 copy, as 'agent-prune eval
    # --compute-dtype bfloat16' measures them; the export itself stays float32
    exported = load_model(str(tmp_path / "compute" / "model"))
    options = read_run_options(tmp_path / "compute")
    with compute_dtype("bfloat16"), evaluated_in(exported.model, owned=True) as model:
        again = run_tasks(model, exported.tokenizer, ["wikitext2"], Path(options.data_dir), seqlen=32,
                          windows=4, batch_size=1)
    assert again["wikitext2"]["nll"] == finals["compute"]["pruned"]["wikitext2"]["nll"]
    assert "Evaluated in bfloat16." in (tmp_path / "compute" / "report.md").read_text()
