"""What measuring the profile during a candidate's refit walk costs (docs/benchmarks.md, "The profile
from the build's refit walk").

1. Per decoder layer of the model, on the run's calibration windows: a plain pass, a pass with the
   profile's collectors hooked (``LayerMeasure``), and reading the statistics off them.
2. One real build, iteration 1's L2 width candidate of a finished run, with and without measuring,
   each in a fresh process: seconds and peak RSS after the model load (``VmHWM``, reset first).

    python bench/walk_profile_cost.py --run runs/demo --layer 5 --json-out /tmp/walk_cost.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished `agent-prune run` folder (its options reused)")
    p.add_argument("--layer", type=int, default=5, help="the layer whose pass is timed")
    p.add_argument("--build", choices=("0", "1"), default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def context(run: Path, out: Path):
    from agent_prune.agent.options import RunOptions
    from agent_prune.agent.runtime import RunContext

    options = json.loads((run / "run.json").read_text())["options"]
    return RunContext(RunOptions.model_validate({**options, "out": str(out)}))


def peak_mib() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) // 1024


def one_build(run: Path, measure: bool) -> dict:
    """Build iteration 1's ``width`` candidate of ``run`` again (under a scratch folder)."""
    from agent_prune.heap import release_memory
    from agent_prune.io import read_json

    scratch = Path(f"/tmp/walk_profile_cost_{int(measure)}")
    ctx = context(run, scratch / "run")
    ctx.base, ctx.calibration  # noqa: B018 (loaded before the measured stretch)
    records = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    built = next(r for r in records if r["event"] == "candidate_built" and r["iteration"] == 1
                 and r["branch"] == "width")
    release_memory()
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    info = ctx.builder.build(ctx.states, run / "checkpoints" / "step-0000", built["actions"],
                             read_json(run / "profiles" / "step-0000.json"), scratch / "candidate", "l2",
                             measure=measure)
    return {"measure": measure, "seconds": round(time.perf_counter() - started, 1), "peak_mib": peak_mib(),
            "profile_measured": info["profile_measured"]}


def layer_costs(run: Path, index: int) -> dict:
    import torch

    from agent_prune.models.streaming import capture_layer_inputs, run_layer
    from agent_prune.sensitivity.measure import LayerMeasure

    ctx = context(run, Path("/tmp/walk_profile_cost_layer/run"))
    adapter, windows = ctx.base.adapter, ctx.calibration
    with torch.no_grad():
        inputs = capture_layer_inputs(adapter, windows, 8, torch.device("cpu"))
        layer, kwargs = adapter.layers()[index], inputs.kwargs[index]
        started = time.perf_counter()
        for batch in inputs.batches:
            run_layer(layer, inputs.hidden[batch], kwargs)
        plain = time.perf_counter() - started
        measure = LayerMeasure(adapter, layer)
        started = time.perf_counter()
        for batch in inputs.batches:
            measure.observe(inputs.hidden[batch], run_layer(layer, inputs.hidden[batch], kwargs))
        measured = time.perf_counter() - started
        measure.detach()
        started = time.perf_counter()
        measure.close()
        statistics = time.perf_counter() - started
    return {"layer": index, "windows": int(windows.shape[0]), "plain_pass_s": round(plain, 3),
            "collectors_s": round(measured - plain, 3), "statistics_s": round(statistics, 3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    if args.build is not None:
        print(json.dumps(one_build(run, args.build == "1")))
        return 0
    result = {"layer": layer_costs(run, args.layer), "builds": []}
    for flag in ("0", "1"):
        child = subprocess.run([sys.executable, __file__, "--run", str(run), "--build", flag],
                               check=True, capture_output=True, text=True)
        result["builds"].append(json.loads(child.stdout.strip().splitlines()[-1]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
