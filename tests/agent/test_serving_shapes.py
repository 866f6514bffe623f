"""Serving shapes: MLP cuts moved so kept widths are multiples of a number, or one width for every
layer, with the step's total kept as close to the request as the shape allows."""

from safetensors.torch import load_file

from agent_prune.agent.candidates import LayerSize, shape_mlp_cuts
from agent_prune.agent.session import start_run
from tests.agent.loop_fixtures import tiny_run_options


def layers(*channels: int) -> list[LayerSize]:
    return [LayerSize(index=i, params=0, num_heads=4, num_kv_heads=2, mlp_channels=c)
            for i, c in enumerate(channels)]


def test_kept_widths_become_multiples_and_the_total_stays_close():
    current = layers(1536, 1536, 1536, 1536)
    cuts = {0: 100, 1: 300, 2: 10, 3: 250}
    shaped = shape_mlp_cuts(cuts, current, multiple=64)
    assert all((1536 - c) % 64 == 0 for c in shaped.values())
    assert abs(sum(shaped.values()) - sum(cuts.values())) <= 32  # within half a multiple
    assert shape_mlp_cuts(cuts, current, multiple=1) == cuts


def test_a_layer_at_its_cap_is_not_pushed_past_it():
    current = layers(128, 128)
    shaped = shape_mlp_cuts({0: 64, 1: 60}, current, multiple=48)
    assert all(c <= 64 for c in shaped.values())  # mlp_cap: half a layer per step
    assert all((128 - c) % 48 == 0 or c == 0 for c in shaped.values())


def test_uniform_cuts_leave_every_layer_one_width():
    current = layers(1536, 1536, 1536)
    shaped = shape_mlp_cuts({0: 900}, current, uniform=True)
    assert set(shaped) == {0, 1, 2} and len({1536 - c for c in shaped.values()}) == 1
    assert sum(shaped.values()) == 900
    aligned = shape_mlp_cuts({0: 900}, current, multiple=64, uniform=True)
    assert len(set(aligned.values())) == 1 and (1536 - aligned[0]) % 64 == 0


def test_a_uniform_run_exports_a_stock_config(tmp_path):
    summary = start_run(tiny_run_options(tmp_path, recovery="none", target_sparsity=0.3, branches=["width"],
                                         uniform_width=True, width_multiple=8,
                                         final_eval={"windows": 0, "speed": False}))
    assert summary["accepted_steps"] >= 1
    model_dir = tmp_path / "run" / "model"
    config = (model_dir / "config.json").read_text()
    assert "layer_widths" not in config and "auto_map" not in config
    weights = load_file(model_dir / "model.safetensors")
    widths = {w.shape[0] for k, w in weights.items() if k.endswith("mlp.up_proj.weight")}
    assert len(widths) == 1 and widths.pop() % 8 == 0
    assert "vLLM" in summary["final"]["loads_in"]
