"""A run whose model does not fit under ``--max-memory`` (``--device-map auto``): its layers spill to
disk, and it takes the same steps, scores the same signals and exports the same bytes as the run that
holds the model whole."""

import pytest

from agent_prune.agent.session import start_run
from agent_prune.agent.trace import read_trace
from agent_prune.errors import InputError
from agent_prune.io import read_json
from agent_prune.models import offload
from tests.agent.loop_fixtures import tiny_run_options

CAP = {"cpu": "300KiB"}  # below the tiny 6-layer model, above its embeddings, lm_head and one layer


def decisions(run) -> list[dict]:
    drop = {"ts", "duration_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in read_trace(run / "trace.jsonl")
            if r["event"] in ("decision", "rollback")]


def signals(run) -> dict[str, dict]:
    paths = sorted(run.glob("candidates/*/*/signals.json")) + sorted(run.glob("checkpoints/*/signals.json"))
    return {str(p.relative_to(run)): {k: v for k, v in read_json(p).items() if k != "seconds"} for p in paths}


def figures(path) -> dict:
    """A report evaluation without its timings."""
    return {task: {k: v for k, v in result.items() if k not in ("seconds", "tokens_per_s")}
            for task, result in read_json(path).items()}


def count_real_layers(monkeypatch) -> tuple[set, list]:
    """The decoder layers that hold real values now, and the most there were at once (counted where
    offload brings a layer in and drops it)."""
    real, most = set(), [0]
    fill, drop = offload._fill, offload._drop

    def counted_fill(layer, values, device):
        fill(layer, values, device)
        real.add(id(layer))
        most[0] = max(most[0], len(real))

    def counted_drop(layer):
        drop(layer)
        real.discard(id(layer))

    monkeypatch.setattr(offload, "_fill", counted_fill)
    monkeypatch.setattr(offload, "_drop", counted_drop)
    return real, most


def test_an_offloaded_run_takes_the_same_steps_and_exports_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_PRUNE_EVAL_CACHE", "off")  # each run measures the dense model itself
    held = start_run(tiny_run_options(tmp_path, out=str(tmp_path / "held")))
    real, most = count_real_layers(monkeypatch)
    offloaded = start_run(tiny_run_options(tmp_path, out=str(tmp_path / "off"), device_map="auto",
                                           max_memory=CAP))
    assert most == [2] and not real  # by construction: a candidate's layer and its dense one in the refit
    assert held["status"] == offloaded["status"] == "target_reached"
    assert (held["accepted_steps"], held["sparsity"]) == (offloaded["accepted_steps"], offloaded["sparsity"])
    runs = [tmp_path / "held", tmp_path / "off"]
    assert decisions(runs[0]) == decisions(runs[1]) and decisions(runs[0])
    assert signals(runs[0]) == signals(runs[1])
    best = f"step-{held['final']['best_step']:04d}.json"
    for name in ("dense.json", best):
        assert figures(runs[0] / "final" / name) == figures(runs[1] / "final" / name)
    weights = [(run / "model" / "model.safetensors").read_bytes() for run in runs]
    assert weights[0] == weights[1]
    loads = [r for r in read_trace(runs[1] / "trace.jsonl") if r.get("phase") == "load model"]
    assert loads[0]["offload"] == "disk"
    assert "speed" in held["final"]
    assert offloaded["final"]["speed_skipped"] == "decoder layers offloaded (disk)"


@pytest.mark.parametrize("option, words", [({"recovery": "distill"}, "distillation"),
                                           ({"export_format": "gguf"}, "GGUF export")])
def test_what_needs_the_whole_model_is_refused_when_it_is_offloaded(tmp_path, option, words):
    options = tiny_run_options(tmp_path, device_map="auto", max_memory=CAP, **option)
    with pytest.raises(InputError, match=words) as info:
        start_run(options)
    assert "raise --max-memory" in info.value.one_line()


def test_two_workers_offload_their_own_models_and_decide_alike(tmp_path):
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers-{workers}"
        start_run(tiny_run_options(tmp_path, out=str(out), device_map="auto", max_memory=CAP, workers=workers,
                                   candidate_threads=1, final_eval={"windows": 0, "speed": False}))
        runs[workers] = (decisions(out), signals(out), (out / "model" / "model.safetensors").read_bytes())
    assert runs[1] == runs[2]
