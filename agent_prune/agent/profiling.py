"""What the loop reads off a state before planning: its sensitivity profile, the compact rows a
planner sees, and the layer sizes that candidates are sized from."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from agent_prune.agent.resources import RunResources
from agent_prune.io import read_json


def profile_state(resources: RunResources, model: nn.Module, manifest) -> dict:
    """The sensitivity profile of ``model`` on the run's calibration windows, with progress bars."""
    from agent_prune.sensitivity import profile_model

    bars: dict[str, object] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = (resources.reporter.task(f"profile: {stage}", total), 0)
        advance, seen = bars[stage]
        advance(done - seen)
        bars[stage] = (advance, done)

    options = resources.options
    with resources.computing():
        result = profile_model(
            model, resources.calibration, device=options.device, progress=progress,
            layer_sources=[record.source for record in manifest.layers], dataset="c4",
            seed=options.seed, model_name=options.model, gradients=options.profile_gradients,
            hessians=options.profile_hessians,
        )
    return result.model_dump(mode="json")


def profile_from_build(model: nn.Module, path: Path) -> dict | None:
    """The profile that the state's build measured during its refit walk (saved at ``path``), when
    its layer fingerprints are those of ``model`` as it is; else None (no such file, or a model that
    changed since, e.g. healed)."""
    from agent_prune.models.adapters import adapter_for
    from agent_prune.sensitivity.fingerprints import layer_fingerprint

    if not path.is_file():
        return None
    profile = read_json(path)
    current = [layer_fingerprint(layer) for layer in adapter_for(model).layers()]
    return profile if current == [layer["fingerprint"] for layer in profile["layers"]] else None


def available_pruners(profile: dict) -> list[str]:
    """The width pruners whose structure scores ``profile`` holds (taylor needs gradients, obs
    hessians)."""
    from agent_prune.agent.proposal import PRUNERS
    from agent_prune.sensitivity.schema import STRUCTURE_FIELDS

    first = profile["layers"][0]
    return [name for name in PRUNERS if first.get(STRUCTURE_FIELDS[name]) is not None]


def profile_rows(profile: dict) -> list[dict]:
    """The compact per-layer rows a planner sees (and the trace's profile table)."""
    protected_layers = {p["layer"] for p in profile.get("protected", []) if p["kind"] == "layer"}
    return [{
        "index": layer["index"], "source": layer["source"], "params": layer["params"],
        "heads": layer["num_heads"], "kv_heads": layer["num_kv_heads"],
        "mlp_channels": layer["intermediate_size"], "protected": layer["index"] in protected_layers,
        "z": {k: round(v, 3) for k, v in layer["z"].items() if v is not None},
    } for layer in profile["layers"]]


def layer_sizes(model: nn.Module) -> list[dict]:
    """Per current layer: its prunable parameters and widths (``candidates.LayerSize`` fields)."""
    from agent_prune.models.adapters import adapter_for

    adapter = adapter_for(model)
    sizes = []
    for index, layer in enumerate(adapter.layers()):
        widths = adapter.layer_widths(layer)
        params = sum(m.weight.numel() for m in adapter.linear_modules(layer).values())
        sizes.append({"index": index, "params": params, "num_heads": widths.num_heads,
                      "num_kv_heads": widths.num_kv_heads, "mlp_channels": widths.intermediate_size})
    return sizes
